"""worker.pipeline.export: the ``ort`` and ``pytorch`` formats load in their own runtimes and agree
with the compressed ONNX model; a conversion that raises or drifts past the recipe's bound fails
that format alone (reason reported, no file left); a format whose extra is missing is refused."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core import exports as core_exports
from core.errors import RecipeError
from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import runner
from worker.pipeline.export import ort_format, torchscript
from worker.pipeline.export.runtime import Runner

FAST = {"latency_runs": 3, "latency_budget_s": 0.2, "layer_errors": False, "export_fidelity_samples": 16}
STATIC = [{"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8}, "min_params": 16}]


def _run(tmp_path: Path, model: onnx.ModelProto, steps: list, export: list[str], **recipe) -> runner.PipelineResult:
    path = tmp_path / "model_in.onnx"
    onnx.save_model(model, str(path))
    data = builders.random_inputs(model, 16)
    return runner.run(path, parse_recipe({"steps": steps, "export": export, **recipe}), calibration=data,
                      evaluation=data, workdir=tmp_path / "work", options=dict(FAST))


def _onnx_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_ort_format_loads_from_that_format_and_agrees(tmp_path):
    result = _run(tmp_path, builders.cnn_bn(), STATIC, ["onnx", "ort"])
    row = result.report["exports"]["ort"]
    work = tmp_path / "work"
    assert row["state"] == "ok", row
    ort_file = work / "model.ort"
    # the file is a flat buffer ("ORTM" identifier at bytes 4..8), not protobuf
    assert ort_file.read_bytes()[4:8] == b"ORTM"
    session = ort_format.load(ort_file)
    feeds = builders.random_inputs(builders.cnn_bn(), 8, seed=5)
    got, want = session.run(None, feeds)[0], _onnx_outputs(result.model_path, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert row["agreement"]["cosine"] >= 0.99 and row["agreement"]["top1_agreement"] == 1.0
    assert row["fidelity"]["cosine"] >= 0.99
    # the reduced-build config names the quantized kernels the model needs, and no worker path
    config = (work / "model.required_operators_and_types.config").read_text()
    ops = ort_format.required_operators(work / "model.required_operators_and_types.config")
    assert any(op.endswith(":QLinearConv") or op.endswith(":ConvInteger") or op.endswith(":DequantizeLinear")
               for op in ops), ops
    assert str(tmp_path) not in config
    files = {f["name"]: f for f in row["files"]}
    assert files["model.ort"]["sha256"] == hashlib.sha256(ort_file.read_bytes()).hexdigest()
    assert row["size_ratio"] == pytest.approx((tmp_path / "model_in.onnx").stat().st_size / ort_file.stat().st_size)
    assert row["latency_ms"]["p50"] > 0


def test_pytorch_module_and_state_dict_keep_int8_and_agree(tmp_path):
    import torch

    model = builders.mlp(inputs=32, hidden=64, classes=4)
    result = _run(tmp_path, model, [{"op": "prune", "sparsity": 0.5}, {"op": "quantize", "weights": {"bits": 8}}],
                  ["onnx", "pytorch"])
    row = result.report["exports"]["pytorch"]
    assert row["state"] == "ok", row
    module = torch.jit.load(str(tmp_path / "work" / "model.pt"))
    feeds = builders.random_inputs(model, 4, seed=7)
    want = _onnx_outputs(result.model_path, feeds)[0]
    got = np.concatenate([module(torch.from_numpy(feeds["x"][i:i + 1]))[0].numpy() for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    state = torch.load(str(tmp_path / "work" / "model.state_dict.pt"), weights_only=True)
    int8 = [name for name, tensor in state.items() if tensor.dtype in (torch.int8, torch.uint8) and tensor.numel() >= 1024]
    assert int8, {name: tensor.dtype for name, tensor in state.items()}
    # pruned zeros survive in the stored integers
    assert max(float((state[name] == 0).float().mean()) for name in int8) >= 0.4
    assert row["agreement"]["cosine"] >= 0.999 and row["converter"]["stored_dtypes"]["int8"] >= 32 * 64


def test_a_drifting_format_fails_alone_and_leaves_no_file(tmp_path, monkeypatch):
    def noisy(ctx):
        session = ort_format.load(ctx.workdir / ort_format.FILES[0])
        rng = np.random.default_rng(0)

        def call(feeds):
            out = session.run(None, feeds)
            return {o.name: value + rng.standard_normal(value.shape).astype(np.float32) * 10
                    for o, value in zip(session.get_outputs(), out)}
        return Runner([o.name for o in session.get_outputs()], call)

    monkeypatch.setattr(ort_format, "runner", noisy)
    result = _run(tmp_path, builders.mlp(inputs=32, hidden=64, classes=4), [{"op": "quantize", "weights": {"bits": 8}}],
                  ["onnx", "ort", "pytorch"])
    rows = result.report["exports"]
    assert rows["ort"]["state"] == "failed" and "export_min_cosine" in rows["ort"]["reason"]
    assert rows["ort"]["agreement"]["cosine"] < 0.99
    assert not (tmp_path / "work" / "model.ort").exists() and "files" not in rows["ort"]
    assert not (tmp_path / "work" / "model.required_operators_and_types.config").exists()
    assert rows["pytorch"]["state"] == "ok" and (tmp_path / "work" / "model.pt").exists()
    assert result.model_path.exists()


def test_a_conversion_that_cannot_translate_fails_with_the_ops_named(tmp_path):
    from onnx import TensorProto, helper

    model = builders.mlp(inputs=32, hidden=64, classes=4)
    # Sin has no translation in the ONNX-to-PyTorch interpreter
    model.graph.node.append(helper.make_node("Sin", ["logits"], ["waves"], name="sin"))
    model.graph.output[0].name = "waves"
    onnx.checker.check_model(model)
    result = _run(tmp_path, model, [{"op": "quantize", "weights": {"bits": 8}}], ["onnx", "pytorch", "ort"])
    rows = result.report["exports"]
    assert rows["pytorch"]["state"] == "failed" and "Sin" in rows["pytorch"]["reason"]
    assert rows["ort"]["state"] == "ok"
    assert not any((tmp_path / "work" / name).exists() for name in torchscript.FILES)
    assert onnx.load(str(result.model_path)).graph.output[0].name == "waves"
    assert TensorProto.FLOAT == onnx.load(str(result.model_path)).graph.output[0].type.tensor_type.elem_type


def test_without_the_extra_the_format_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(core_exports, "_installed", lambda module: module != "onnx2tf")
    with pytest.raises(RecipeError) as caught:
        _run(tmp_path, builders.mlp(inputs=32, hidden=64, classes=4), [{"op": "quantize", "weights": {"bits": 8}}],
             ["onnx", "tflite"])
    assert caught.value.errors[0]["loc"] == ["export", 1]
    assert "featherweight[tflite]" in caught.value.errors[0]["msg"]
    assert not (tmp_path / "work").exists()


def test_recipe_export_field():
    assert parse_recipe({"steps": [{"op": "fp16"}]}).export == ["onnx"]
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"steps": [{"op": "fp16"}], "export": ["onnx", "coreml"]})
    assert caught.value.errors[0]["loc"] == ["export", 1]
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"steps": [{"op": "fp16"}], "export": ["ort", "ort"]})
    assert caught.value.errors[0]["loc"] == ["export"]
    assert parse_recipe({"steps": [{"op": "fp16"}], "export": ["ort", "onnx"]}).extra_formats() == ["ort"]


def test_report_html_lists_each_format_with_its_state():
    from worker.pipeline.report_html import render_html

    report = {"exports": {"ort": {"state": "ok", "bytes": 2048, "size_ratio": 3.9,
                                  "agreement": {"cosine": 1.0, "top1_agreement": 1.0}, "fidelity": {"cosine": 0.999},
                                  "latency_ms": {"p50": 0.1}},
                          "pytorch": {"state": "failed", "reason": "conversion failed: no translation for Sin"}}}
    page = render_html(report, title="t")
    assert "Deploy formats" in page and "no translation for Sin" in page and "3.9" in page
    assert "Deploy formats" not in render_html({}, title="t")


def test_ort_keeps_int8_weights_instead_of_folding_them_to_float(tmp_path):
    # ONNX Runtime's constant folding would turn int8 -> Cast -> Mul into a float weight: a file
    # as big as the float model
    result = _run(tmp_path, builders.mlp(), [{"op": "quantize", "weights": {"bits": 8}}], ["onnx", "ort"])
    row = result.report["exports"]["ort"]
    assert row["state"] == "ok"
    assert row["size_ratio"] >= 2.5, row["converter"]
    assert row["converter"]["candidate_bytes"]["all"] > row["bytes"]


@pytest.mark.parametrize("bits, stored", [(4, "int4"), (2, "int2")])
def test_ort_format_of_sub_byte_weights_fails_alone_and_says_why(tmp_path, bits, stored):
    # ONNX Runtime writes the ORT file, then cannot load it (no int4 / int2 tensors in that format);
    # its config tool failed first with "KeyError: 22" (26 for int2), which was all the report said
    step = {"op": "quantize", "weights": {"bits": bits, "granularity": "block", "block_size": 32}, "format": "qdq"}
    result = _run(tmp_path, builders.mlp(), [step], ["onnx", "ort"])
    row = result.report["exports"]["ort"]
    assert row["state"] == "failed" and f"holds no {stored} tensors" in row["reason"]
    assert result.model_path.is_file()                     # the job and its .onnx stand
    assert not (tmp_path / "work" / "model.ort").exists()


def test_a_float16_model_is_not_exported_to_pytorch_with_float32_weights(tmp_path):
    result = _run(tmp_path, builders.mlp(inputs=32, hidden=64, classes=4), [{"op": "fp16"}], ["onnx", "pytorch", "ort"])
    rows = result.report["exports"]
    assert rows["pytorch"]["state"] == "failed" and "float16" in rows["pytorch"]["reason"]
    assert rows["ort"]["state"] == "ok"


def test_with_labels_each_format_reports_its_own_accuracy(tmp_path):
    model = builders.mlp(inputs=32, hidden=64, classes=4)
    path = tmp_path / "model_in.onnx"
    onnx.save_model(model, str(path))
    data = builders.random_inputs(model, 16)
    # labels the original model gets right: the compressed formats should too
    data["_labels"] = builders.run_ort(model, data)[0].argmax(1)
    result = runner.run(path, parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}}], "export": ["ort"]}),
                        evaluation=data, workdir=tmp_path / "work", options=dict(FAST))
    row = result.report["exports"]["ort"]
    assert row["accuracy"] == pytest.approx(result.report["accuracy"]["compressed"])
    assert row["accuracy"] >= 0.9


def test_tflite_conversion_finds_onnx2tfs_sample_images_offline(tmp_path, monkeypatch):
    # onnx2tf downloads sample images from GitHub for a model whose inputs are all NHWC images unless
    # the file is in the working directory: an offline worker's tflite export of such a model failed
    from worker.pipeline.export import tflite_convert

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "job"
    folder.mkdir()
    tflite_convert._offline_sample_images(folder)
    assert Path.cwd() == folder
    images = np.load(folder / tflite_convert.SAMPLE_IMAGES)
    assert images.shape == (20, 128, 128, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() < 1.0
