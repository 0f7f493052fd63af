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
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply
from worker.pipeline import runner
from worker.pipeline.quantize import dequantize_form


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types ONNX Runtime keeps after its graph optimizations (constant folding included)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _dequantized_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each weight DequantizeLinear replaced by its output, computed here in numpy:
    (q - z) * s, with s and z repeated over blocks or broadcast along the axis (ONNX semantics)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            out.graph.node.append(node)
            continue
        q = inits[node.input[0]].astype(np.float32)
        attrs = {a.name: a.i for a in node.attribute}
        axis, block = attrs.get("axis", 1) % q.ndim, attrs.get("block_size", 0)

        def spread(values):
            values = np.asarray(values, dtype=np.float32)
            if block:
                return np.take(np.repeat(values, block, axis=axis), np.arange(q.shape[axis]), axis=axis)
            if values.ndim == 1 and values.size > 1:
                shape = [1] * q.ndim
                shape[axis] = values.size
                return values.reshape(shape)
            return values

        zero = spread(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.float32(0)
        weight = ((q - zero) * spread(inits[node.input[1]])).astype(np.float32)
        out.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
    return out


def _canonical(model: onnx.ModelProto):
    return ([n.SerializeToString() for n in model.graph.node],
            sorted(t.SerializeToString() for t in model.graph.initializer))


@pytest.mark.parametrize("build, weights", [
    (builders.cnn_bn, {"bits": 8}), (builders.cnn_bn, {"bits": 8, "symmetric": False}),
    (builders.cnn_bn, {"bits": 8, "granularity": "tensor"}), (builders.cnn_bn, {"bits": 4, "granularity": "channel"}),
    (builders.mlp, {"bits": 4, "granularity": "block", "block_size": 16}),
    (builders.mlp, {"bits": 4, "granularity": "block", "block_size": 32, "symmetric": False}),
    (builders.mlp, {"bits": 2, "granularity": "block", "block_size": 32}),
])
def test_folded_form_computes_the_same_and_is_folded_at_load(build, weights, tmp_path):
    model = build()
    feeds = builders.random_inputs(model, count=8)
    result, _ = apply(model, {"weights": weights, "min_params": 0})
    quantized = result.model
    # the float model of the dequantized weights (ORT's CPU provider runs blocked DequantizeLinear +
    # MatMul as its own lower-precision kernel, so the DequantizeLinear form is no exact reference)
    expected = builders.run_ort(_dequantized_float(quantized), feeds)
    stored = {t.name: t.data_type for t in quantized.graph.initializer if t.name.endswith("_quantized")}
    before = _canonical(quantized)
    found = dequantize_form.weight_only_dequantizers(quantized)
    assert {n.output[0] for n in found} == ({"conv1.W", "conv2.W", "fc.W"} if build is builders.cnn_bn else {"W1", "W2"})
    done = dequantize_form.fold(quantized, found)
    onnx.checker.check_model(quantized, full_check=True)
    assert "DequantizeLinear" not in [n.op_type for n in quantized.graph.node]
    assert {t.name: t.data_type for t in quantized.graph.initializer if t.name in stored} == stored   # integers kept
    np.testing.assert_allclose(builders.run_ort(quantized, feeds)[0], expected[0], rtol=1e-5, atol=1e-5)
    # ORT folds the Cast / Mul chains once: the layers read constant float weights
    ops = _optimized_ops(quantized, tmp_path)
    assert not {"Cast", "Mul", "Sub", "DequantizeLinear", "Expand", "Slice"} & set(ops)
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


def test_a_weight_read_inside_an_if_body_is_folded_too(tmp_path):
    """An LSTM inside an If (silero-vad's shape): its W / R DequantizeLinear live in the main graph
    and only the branch reads them. Folded, ONNX Runtime computes them once at load: no
    DequantizeLinear left, and the same values."""
    from core.recipe import QuantizeStep
    from worker.pipeline.quantize.static import quantize_static
    from worker.pipeline.step import StepContext

    model = builders.lstm_in_if()
    calibration = {"x": np.random.default_rng(4).standard_normal((4, 5, 1, 32)).astype(np.float32)}
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=1024)
    quantized = quantize_static(model, params, StepContext(original=model, calibration=calibration)).model
    chosen = {node.output[0] for node in dequantize_form.weight_only_dequantizers(quantized)}
    assert {"lstm_W", "lstm_R"} <= chosen
    reference = _dequantized_float(quantized)
    dequantize_form.fold(quantized, dequantize_form.weight_only_dequantizers(quantized))
    assert "DequantizeLinear" not in _optimized_ops(quantized, tmp_path)
    feeds = {"x": calibration["x"][0]}
    np.testing.assert_allclose(builders.run_ort(quantized, feeds)[0], builders.run_ort(reference, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def _weight_only(build, weights):
    result, _ = apply(build(), {"weights": weights, "min_params": 0, "format": "qdq"})
    return result.model


def test_unfused_8_bit_weights_are_folded_without_a_race(monkeypatch):
    """int8 per-channel weight-only DequantizeLinear: ONNX Runtime's CPU graph keeps every one of
    them (no kernel reads the integers fused), so the folded form is taken without timing runs."""
    model = _weight_only(builders.cnn_bn, {"bits": 8})
    names = {n.output[0] for n in dequantize_form.weight_only_dequantizers(model)}
    raced = []
    monkeypatch.setattr(dequantize_form.metrics, "latency", lambda *a, **k: raced.append(1) or [{"p50": 1.0}] * 2)
    feeds = {k: v[:1] for k, v in builders.random_inputs(model, count=1).items()}
    decision = dequantize_form.choose_form(model, feeds, "cpu-x86")
    assert raced == []
    assert decision["form"] == "folded" and set(decision["weights"]) == names
    assert decision["reason"] == dequantize_form.UNFUSED and "latency_ms" not in decision
    assert not dequantize_form.weight_only_dequantizers(model)


def test_a_fused_weight_only_dequantizer_is_raced(monkeypatch):
    """Where ONNX Runtime fused a weight-only DequantizeLinear into a kernel (or the graph could not
    be read), the forms are timed as before: here the race says DequantizeLinear is faster."""
    model = _weight_only(builders.cnn_bn, {"bits": 8})
    monkeypatch.setattr(dequantize_form, "_session_and_fusions",
                        lambda m, provider, found: (dequantize_form._session(m, provider), False))
    monkeypatch.setattr(dequantize_form.metrics, "latency", lambda *a, **k: [{"p50": 1.0}, {"p50": 2.0}])
    feeds = {k: v[:1] for k, v in builders.random_inputs(model, count=1).items()}
    decision = dequantize_form.choose_form(model, feeds, "cpu-x86")
    assert decision == {"form": "qdq", "weights": [], "latency_ms": {"qdq": 1.0, "folded": 2.0}}
    assert dequantize_form.weight_only_dequantizers(model)


def test_the_race_settles_early_only_on_a_clear_difference():
    """(qdq, folded) times: folded is kept unless DequantizeLinear is 3 % faster, so a tie settles
    for folded at once; DequantizeLinear ahead by about the margin, or preempted runs, do not settle."""
    clear = [[10.0, 10.2, 9.9, 10.1, 10.0], [8.0, 8.1, 7.9, 8.2, 8.0]]
    tie = [[10.0, 10.2, 9.9, 10.1, 10.0], [9.9, 10.1, 10.0, 10.2, 9.8]]
    near_margin = [[9.5, 9.7, 9.6, 9.8, 9.4], [10.0, 10.1, 9.9, 10.2, 10.0]]
    preempted = [[10.0, 50.0, 10.1, 49.0, 10.0], [8.0, 8.1, 48.0, 8.2, 47.0]]
    assert dequantize_form._settled(clear)
    assert dequantize_form._settled(clear[::-1])
    assert dequantize_form._settled(tie)
    assert not dequantize_form._settled(near_margin)
    assert not dequantize_form._settled(preempted)


def test_a_per_channel_scale_is_stored_shaped_with_no_reshape_node():
    """The folded form stores a per-channel scale that only its DequantizeLinear read already shaped
    [C, 1, 1, 1] (the same values), so no Reshape node or shape tensor is written for it; unfold
    puts the 1-D scale back."""
    model = builders.cnn_bn()
    result, _ = apply(model, {"weights": {"bits": 8}, "min_params": 0})
    quantized = result.model
    scales = {n.input[1]: numpy_helper.to_array(t) for n in quantized.graph.node if n.op_type == "DequantizeLinear"
              for t in quantized.graph.initializer if t.name == n.input[1]}
    found = dequantize_form.weight_only_dequantizers(quantized)
    done = dequantize_form.fold(quantized, found)
    assert "Reshape" not in [n.op_type for n in quantized.graph.node]
    after = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name in scales}
    for name, values in scales.items():
        if values.size > 1:
            assert after[name].ndim > 1 and sorted(after[name].shape)[-1] == values.size == after[name].size
            np.testing.assert_array_equal(after[name].reshape(-1), values)
    dequantize_form.unfold(quantized, done)
    assert {t.name: numpy_helper.to_array(t).shape for t in quantized.graph.initializer if t.name in scales} == \
        {name: values.shape for name, values in scales.items()}
