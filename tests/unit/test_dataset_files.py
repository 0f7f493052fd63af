"""``featherweight dataset`` and ``featherweight.dataset_files``: images, audio and text become the .npz a
model's jobs accept (checked with the worker's own binding), and unreadable files are refused by name."""
from __future__ import annotations

import wave

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from featherweight import client, dataset_files
from featherweight.cli import main as cli_main
from worker.pipeline.data import bind, load_npz

Image = pytest.importorskip("PIL.Image")


def _model(path, inputs, elem=TensorProto.FLOAT):
    """A model whose inputs are ``inputs`` ({name: shape}) and whose output reads them all."""
    values = [helper.make_tensor_value_info(name, elem, shape) for name, shape in inputs.items()]
    nodes = [helper.make_node("Identity", [name], [f"out_{name}"], name=f"id_{name}") for name in inputs]
    outputs = [helper.make_tensor_value_info(f"out_{name}", elem, shape) for name, shape in inputs.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", values, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def _images(folder, sizes, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for index, (w, h) in enumerate(sizes):
        sub = folder / classes[index % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(sub / f"img{index}.png")


# ---------------------------------------------------------------------------- images


def test_images_nchw_from_the_model_normalized_and_labelled(tmp_path, capsys):
    model = _model(tmp_path / "m.onnx", {"pixel_values": ["batch", 3, 8, 6]})
    _images(tmp_path / "imgs", [(20, 10), (6, 8), (9, 9), (30, 40)])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    code = cli_main(["dataset", "images", str(tmp_path / "imgs"), "--model", str(tmp_path / "m.onnx"),
                     "--mean", "0.5,0.4,0.3", "--std", "0.2", "-o", str(tmp_path / "d.npz")])
    assert code == 0
    out = capsys.readouterr().out
    assert "pixel_values" in out and "[4, 3, 8, 6]" in out and "float32" in out and "_labels" in out
    arrays = load_npz(tmp_path / "d.npz")
    assert arrays["pixel_values"].shape == (4, 3, 8, 6)
    assert arrays["_labels"].tolist() == [0, 0, 1, 1]   # sorted paths: cat/img0, cat/img2, dog/img1, dog/img3
    bound = bind(model, arrays)
    assert bound.size == 4
    # dog/img1 is 6x8 already: no resize, so its values are exactly (p / 255 - mean) / std
    raw = np.asarray(Image.open(tmp_path / "imgs" / "dog" / "img1.png"), np.float32)
    expected = ((raw / 255 - np.array([0.5, 0.4, 0.3], np.float32)) / 0.2).transpose(2, 0, 1)
    np.testing.assert_allclose(arrays["pixel_values"][2], expected, rtol=1e-5, atol=1e-5)


def test_images_nhwc_bgr_uint8_raw(tmp_path):
    model = _model(tmp_path / "m.onnx", {"image": [1, 5, 5, 3]}, elem=TensorProto.UINT8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.arange(75, dtype=np.uint8).reshape(5, 5, 3)
    Image.fromarray(pixels, "RGB").save(folder / "a.png")
    built = dataset_files.build_from_images(folder, tmp_path / "d.npz", model=tmp_path / "m.onnx",
                                            options=dataset_files.ImageOptions(channels="bgr"))
    arrays = load_npz(built.path)
    assert arrays["image"].dtype == np.uint8 and arrays["image"].shape == (1, 5, 5, 3)
    np.testing.assert_array_equal(arrays["image"][0], pixels[:, :, ::-1])
    assert "_labels" not in arrays          # no class sub-folders
    bind(model, arrays)


def test_images_dynamic_size_needs_size_flag_and_crop_keeps_aspect(tmp_path, capsys):
    _model(tmp_path / "m.onnx", {"x": ["n", 1, "h", "w"]})
    folder = tmp_path / "imgs"
    folder.mkdir()
    # left half black, right half white: a centre crop of a wide image keeps both halves
    wide = np.zeros((10, 40), np.uint8)
    wide[:, 20:] = 255
    Image.fromarray(wide, "L").save(folder / "wide.png")
    assert cli_main(["dataset", "images", str(folder), "--model", str(tmp_path / "m.onnx"),
                     "-o", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "m.onnx" in err and "--size" in err
    assert not (tmp_path / "d.npz").exists()
    assert cli_main(["dataset", "images", str(folder), "--model", str(tmp_path / "m.onnx"), "--size", "4x4",
                     "-o", str(tmp_path / "d.npz")]) == 0
    x = load_npz(tmp_path / "d.npz")["x"]
    assert x.shape == (1, 1, 4, 4)
    assert x[0, 0, :, 0].max() < 0.1 and x[0, 0, :, -1].min() > 0.9


def test_unreadable_image_is_refused_by_name(tmp_path, capsys):
    _model(tmp_path / "m.onnx", {"x": ["n", 3, 4, 4]})
    _images(tmp_path / "imgs", [(4, 4)])
    bad = tmp_path / "imgs" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    code = cli_main(["dataset", "images", str(tmp_path / "imgs"), "--model", str(tmp_path / "m.onnx"),
                     "-o", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("featherweight: error: ") and str(bad) in err
    assert not (tmp_path / "d.npz").exists() and list(tmp_path.glob(".d.npz*")) == []


def test_ambiguous_layout_and_wrong_channels_are_refused(tmp_path):
    _model(tmp_path / "m.onnx", {"x": ["n", 3, 4, 3]})
    _images(tmp_path / "imgs", [(4, 4)])
    with pytest.raises(dataset_files.DatasetBuildError, match="--layout"):
        dataset_files.build_from_images(tmp_path / "imgs", tmp_path / "d.npz", model=tmp_path / "m.onnx")
    built = dataset_files.build_from_images(tmp_path / "imgs", tmp_path / "d.npz", model=tmp_path / "m.onnx",
                                            options=dataset_files.ImageOptions(layout="nhwc"))
    assert built.arrays[0].shape == (1, 3, 4, 3)
    _model(tmp_path / "g.onnx", {"x": ["n", 1, 4, 4]})
    with pytest.raises(dataset_files.DatasetBuildError, match="channel"):
        dataset_files.build_from_images(tmp_path / "imgs", tmp_path / "d.npz", model=tmp_path / "g.onnx",
                                        options=dataset_files.ImageOptions(channels="rgb"))


def test_images_without_a_model_use_the_flags(tmp_path):
    _images(tmp_path / "imgs", [(7, 7), (3, 9)])
    built = client.dataset_from_images(tmp_path / "imgs", tmp_path / "d.npz", input_name="input", size=(4, 6),
                                       layout="nhwc", labels=False)
    arrays = load_npz(built.path)
    assert set(arrays) == {"input"} and arrays["input"].shape == (2, 4, 6, 3)
    assert 0.0 <= arrays["input"].min() and arrays["input"].max() <= 1.0


# ---------------------------------------------------------------------------- audio


def _wav(path, signal, rate):
    """16-bit PCM with the standard library, so the reader is checked against another writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(signal.shape[1] if signal.ndim == 2 else 1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


def test_audio_resampled_and_framed_to_the_input_length(tmp_path, capsys):
    pytest.importorskip("soundfile")
    model = _model(tmp_path / "m.onnx", {"waveform": ["batch", 1, 1000]})
    t = np.arange(8000 * 3 // 2) / 8000.0                                   # 1.5 s at 8 kHz
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _wav(tmp_path / "wavs" / "yes" / "a.wav", tone, 8000)
    _wav(tmp_path / "wavs" / "no" / "b.wav", np.stack([tone[:800], -tone[:800]], axis=1), 8000)   # stereo
    code = cli_main(["dataset", "audio", str(tmp_path / "wavs"), "--model", str(tmp_path / "m.onnx"),
                     "--sample-rate", "2000", "-o", str(tmp_path / "d.npz")])
    assert code == 0
    out = capsys.readouterr().out
    assert "waveform" in out and "[4, 1, 1000]" in out
    arrays = load_npz(tmp_path / "d.npz")
    # b.wav (0.1 s -> 200 samples) is one padded frame; a.wav (1.5 s -> 3000 samples) three frames
    assert arrays["waveform"].shape == (4, 1, 1000)
    assert arrays["_labels"].tolist() == [0, 1, 1, 1]          # sorted classes: no, yes
    first = arrays["waveform"][0, 0]
    np.testing.assert_allclose(first, 0.0, atol=1e-3)          # stereo halves cancel when mixed to mono
    frame = arrays["waveform"][1, 0]
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(1000) / 2000.0)
    assert np.abs(frame[50:-50] - expected[50:-50]).max() < 0.02   # resampled, not just decimated
    bind(model, arrays)


def test_unreadable_audio_is_refused_by_name(tmp_path, capsys):
    pytest.importorskip("soundfile")
    _model(tmp_path / "m.onnx", {"audio": ["batch", 400]})
    (tmp_path / "wavs").mkdir()
    bad = tmp_path / "wavs" / "noise.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    code = cli_main(["dataset", "audio", str(tmp_path / "wavs"), "--model", str(tmp_path / "m.onnx"),
                     "-o", str(tmp_path / "d.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(bad) in err
    assert not (tmp_path / "d.npz").exists()


# ---------------------------------------------------------------------------- text


def _tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8}
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(path))


def test_text_lines_tokenized_to_the_models_inputs(tmp_path, capsys):
    _tokenizer(tmp_path / "tokenizer.json")
    model = _model(tmp_path / "m.onnx", {"input_ids": ["batch", 6], "attention_mask": ["batch", 6],
                                         "token_type_ids": ["batch", 6]}, elem=TensorProto.INT64)
    (tmp_path / "lines.txt").write_text("the cat sat\n\nthe cat sat on the mat\ndog\n", encoding="utf-8")
    code = cli_main(["dataset", "text", str(tmp_path / "lines.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--model", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "d.npz")])
    assert code == 0
    assert "input_ids" in capsys.readouterr().out
    arrays = load_npz(tmp_path / "d.npz")
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    assert arrays["input_ids"].tolist() == [[2, 4, 5, 6, 3, 0], [2, 4, 5, 6, 7, 3], [2, 1, 3, 0, 0, 0]]   # truncated, [SEP] kept
    assert arrays["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert arrays["input_ids"].dtype == np.int64
    assert bind(model, arrays).size == 3


def test_text_without_a_model_pads_to_the_longest_line(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "lines.txt").write_text("the cat\nthe cat sat on the mat\n", encoding="utf-8")
    built = client.dataset_from_text(tmp_path / "lines.txt", tmp_path / "tokenizer.json", tmp_path / "d.npz")
    arrays = load_npz(built.path)
    assert arrays["input_ids"].shape == (2, 8) and arrays["attention_mask"][0].tolist() == [1] * 4 + [0] * 4


def test_bad_tokenizer_and_bad_text_are_refused_by_name(tmp_path, capsys):
    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "lines.txt").write_text("the cat\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert cli_main(["dataset", "text", str(tmp_path / "lines.txt"), "--tokenizer", str(tmp_path / "bad.json"),
                     "-o", str(tmp_path / "d.npz")]) == 2
    assert str(tmp_path / "bad.json") in capsys.readouterr().err
    assert cli_main(["dataset", "text", str(tmp_path / "latin1.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "-o", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "latin1.txt") in err and err.count("\n") == 0


def test_a_model_input_text_cannot_fill_is_refused(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json")
    _model(tmp_path / "m.onnx", {"input_ids": ["batch", 4], "pixel_values": ["batch", 4]}, elem=TensorProto.INT64)
    (tmp_path / "lines.txt").write_text("the cat\n", encoding="utf-8")
    with pytest.raises(dataset_files.DatasetBuildError, match="pixel_values"):
        dataset_files.build_from_text(tmp_path / "lines.txt", tmp_path / "tokenizer.json", tmp_path / "d.npz",
                                      model=tmp_path / "m.onnx")


def test_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["dataset", "images", str(tmp_path / "empty"), "--input", "x", "--size", "4x4",
                     "-o", str(tmp_path / "d.npz")]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err


def test_an_output_in_a_missing_folder_is_refused_by_name(tmp_path, capsys):
    _images(tmp_path / "imgs", [(4, 4)])
    target = tmp_path / "nowhere" / "d.npz"
    assert cli_main(["dataset", "images", str(tmp_path / "imgs"), "--input", "x", "--size", "4x4",
                     "-o", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(target) in err and err.count("\n") == 0


def test_a_missing_reader_names_the_extra(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "imgs", [(4, 4)])
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)      # as if Pillow were not installed
    assert cli_main(["dataset", "images", str(tmp_path / "imgs"), "--input", "x", "--size", "4x4",
                     "-o", str(tmp_path / "d.npz")]) == 2
    assert "featherweight[dataset]" in capsys.readouterr().err
