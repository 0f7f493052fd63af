"""Weight-only DequantizeLinear folded to Cast / Mul: the same values, constant-folded by ONNX
Runtime at load (so the layer reads a constant float weight), integers kept in the file, static
int8's fused pairs left alone, and the runner's choice reported."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from tests.unit.pipeline.test_quantize_weight_only import apply
from worker.pipeline import runner
from worker.pipeline.quant import dequantize_form


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types ONNX Runtime keeps after its graph optimizations (constant folding included)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _canonical(model: onnx.ModelProto):
    return ([n.SerializeToString() for n in model.graph.node],
            sorted(t.SerializeToString() for t in model.graph.initializer))


@pytest.mark.parametrize("weights", [{"bits": 8}, {"bits": 8, "symmetric": False},
                                     {"bits": 8, "granularity": "tensor"}, {"bits": 4, "granularity": "channel"}])
def test_folded_form_computes_the_same_and_is_folded_at_load(weights, tmp_path):
    model = builders.cnn_bn()
    feeds = builders.random_inputs(model, count=8)
    result, _ = apply(model, {"weights": weights, "min_params": 0})
    quantized = result.model
    expected = builders.run_ort(quantized, feeds)
    stored = {t.name: t.data_type for t in quantized.graph.initializer if t.name.endswith("_quantized")}
    before = _canonical(quantized)
    found = dequantize_form.weight_only_dequantizers(quantized)
    assert {n.output[0] for n in found} == {"conv1.W", "conv2.W", "fc.W"}
    done = dequantize_form.fold(quantized, found)
    onnx.checker.check_model(quantized, full_check=True)
    assert "DequantizeLinear" not in [n.op_type for n in quantized.graph.node]
    assert {t.name: t.data_type for t in quantized.graph.initializer if t.name in stored} == stored   # integers kept
    np.testing.assert_allclose(builders.run_ort(quantized, feeds)[0], expected[0], rtol=1e-5, atol=1e-5)
    # ORT folds the Cast / Mul chains once: the layers read constant float weights
    ops = _optimized_ops(quantized, tmp_path)
    assert not {"Cast", "Mul", "Sub", "DequantizeLinear"} & set(ops)
    dequantize_form.unfold(quantized, done)
    assert _canonical(quantized) == before


def test_static_int8_pairs_are_left_for_the_integer_kernels():
    model = builders.cnn_bn()
    calibration = builders.random_inputs(model, count=32)
    result, _ = apply(model, {"weights": {"bits": 8}, "activations": {"bits": 8, "calibration": "minmax"}},
                      calibration=calibration)
    assert dequantize_form.weight_only_dequantizers(result.model) == []


@pytest.mark.parametrize("forced, fmt, form", [("folded", "auto", "folded"), (None, "qdq", "qdq")])
def test_runner_reports_the_form(tmp_path, forced, fmt, form):
    path = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn_bn(), str(path))
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "format": fmt, "min_params": 0}]})
    options = {"latency_runs": 3, "layer_errors": False, **({"dequantize_form": forced} if forced else {})}
    outcome = runner.run(path, recipe, workdir=tmp_path / "work", options=options)
    report = outcome.report
    assert report["steps"][0]["dequantize_form"]["form"] == form
    ops = [n.op_type for n in onnx.load(str(outcome.model_path)).graph.node]
    assert ("DequantizeLinear" in ops) == (form == "qdq")
    formats = {layer["name"]: layer.get("format") for layer in report["layers"]}
    assert (formats["conv1.W"] or "").startswith("folded") == (form == "folded")
