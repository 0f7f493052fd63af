"""quantize.smoothquant: exact in float (outputs within 1e-5 relative), factors folded into a
LayerNorm's gamma / beta where the layers are its only readers, a Mul inserted otherwise; and under
static int8 it lowers the error of a model whose activations have outlier channels."""
from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline.data import bind
from worker.pipeline.quantize import smoothquant
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext

D, H = 64, 128


def _block(seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNormalization (outlier gammas) -> {q, k} MatMuls + residual Add (the LN output has
    another reader: a Mul is inserted) -> decomposed norm Mul(gamma) / Add(beta) -> MatMul (folded)."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(D, np.float32)
    gamma[[3, 17, 40]] = [30.0, -25.0, 40.0]               # outlier channels, as in BERT's LayerNorms
    inits = [numpy_helper.from_array(gamma, "ln_gamma"),
             numpy_helper.from_array((rng.standard_normal(D) * 0.1).astype(np.float32), "ln_beta"),
             numpy_helper.from_array((rng.standard_normal((D, D)) / 8).astype(np.float32), "Wq"),
             numpy_helper.from_array((rng.standard_normal((D, D)) / 8).astype(np.float32), "Wk"),
             numpy_helper.from_array(gamma[::-1].copy(), "g2"),
             numpy_helper.from_array((rng.standard_normal(D) * 0.1).astype(np.float32), "b2"),
             numpy_helper.from_array((rng.standard_normal((D, H)) / 8).astype(np.float32), "W2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_gamma", "ln_beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "Wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["ln", "Wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["qk"], name="qk"),
             helper.make_node("Add", ["qk", "ln"], ["res"], name="residual"),
             helper.make_node("Mul", ["res", "g2"], ["scaled"], name="norm_mul"),
             helper.make_node("Add", ["scaled", "b2"], ["normed"], name="norm_add"),
             helper.make_node("MatMul", ["normed", "W2"], ["y"], name="out")]
    graph_ = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, D])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, H])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(count: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((count, 8, D)).astype(np.float32)}


def test_smoothing_is_exact_in_float_and_folds_where_it_can():
    model, calibration = _block(), _data()
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    nodes = [n for n in smoothed.graph.node if n.op_type == "MatMul"]
    done = smoothquant.smooth(smoothed, bind(smoothed, calibration), nodes, alpha=0.5)
    assert sorted(done) == ["ln", "normed"]
    onnx.checker.check_model(smoothed, full_check=True)
    before, after = builders.run_ort(model, calibration)[0], builders.run_ort(smoothed, calibration)[0]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5
    inserted = [n for n in smoothed.graph.node if n.name.endswith("_smooth")]
    assert [n.input[0] for n in inserted] == ["ln"]       # the residual still reads the unscaled LN output
    assert not any(n.input[0] == "normed" for n in inserted)   # folded into the decomposed norm's gamma / beta
    original_g2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "g2"))
    g2 = numpy_helper.to_array(next(t for t in smoothed.graph.initializer if t.name == "g2"))
    assert np.abs(g2).max() < 0.5 * np.abs(original_g2).max()    # the outlier channels were flattened


def test_factors_follow_the_formula():
    s = smoothquant.factors(np.array([16.0, 0.0, 1.0]), np.array([1.0, 2.0, 4.0]), alpha=0.5)
    assert np.allclose(s, [4.0, 1.0, 0.5])


def _error(model, result_model, data) -> float:
    return builders.rel_l2(builders.run_ort(model, data), builders.run_ort(result_model, data))


def test_static_int8_with_smoothquant_has_lower_error_on_outlier_channels():
    model, calibration = _block(), _data()
    errors = {}
    for alpha in (None, 0.5):
        params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"},
                              min_params=0, smoothquant=alpha, bias_correction=False)
        result = quantize_static(model, params, StepContext(original=model, calibration=calibration))
        onnx.checker.check_model(result.model, full_check=True)
        errors[alpha] = _error(model, result.model, calibration)
        assert result.metrics["smoothed_inputs"] == (0 if alpha is None else 2)
    assert errors[0.5] < 0.7 * errors[None]


def test_gemm_with_transposed_weight_is_smoothed_exactly():
    rng = np.random.default_rng(2)
    gamma = np.ones(D, np.float32)
    gamma[[5, 9]] = [20.0, -30.0]
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(np.zeros(D, np.float32), "b"),
             numpy_helper.from_array((rng.standard_normal((H, D)) / 8).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal(H) / 8).astype(np.float32), "c")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("Gemm", ["ln", "W", "c"], ["y"], transB=1, name="fc")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", H])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = {"x": rng.standard_normal((32, D)).astype(np.float32)}
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    assert smoothquant.smooth(smoothed, bind(smoothed, calibration), [smoothed.graph.node[1]], alpha=0.5) == ["ln"]
    assert len(smoothed.graph.node) == 2          # folded into the LayerNormalization's scale and bias
    before, after = builders.run_ort(model, calibration)[0], builders.run_ort(smoothed, calibration)[0]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5


def test_static_int8_smooths_and_calibrates_in_one_pass_with_the_ranges_of_two(monkeypatch):
    """The calibration pass sets s from its first samples and feeds the smoothed tensors' histograms
    ``x / s``: the ranges are those of calibrating the model smoothed beforehand, with one pass over
    the data fewer."""
    from worker.pipeline import activations, calibrate

    model, calibration = _block(), _data(smoothquant.SAMPLES)
    ahead = onnx.ModelProto()
    ahead.CopyFrom(model)
    smoothquant.smooth(ahead, bind(ahead, calibration), [n for n in ahead.graph.node if n.op_type == "MatMul"], 0.5)
    deferred_model = onnx.ModelProto()
    deferred_model.CopyFrom(model)
    pending = smoothquant.prepare(deferred_model, [n for n in deferred_model.graph.node if n.op_type == "MatMul"])
    tensors = [item.tensor for item in pending]
    assert tensors == ["ln_smoothed", "normed"]
    deferred = calibrate.DeferredScales(tensors, smoothquant.SAMPLES,
                                        lambda maxima: smoothquant.resolve(deferred_model, pending, maxima, 0.5))
    passes = []
    original = activations.capture_counted

    def counted(*args, **kwargs):
        passes.append(1)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(calibrate.activations, "capture_counted", counted)
    one_pass = calibrate.calibrate(deferred_model, bind(deferred_model, calibration), tensors, batch_size=8,
                                   deferred=deferred)
    assert len(passes) == 1 and all(item.done for item in pending)
    two_passes = calibrate.calibrate(ahead, bind(ahead, calibration), tensors, batch_size=8)
    for name in tensors:
        assert one_pass[name].lo == pytest.approx(two_passes[name].lo, rel=1e-4)
        assert one_pass[name].hi == pytest.approx(two_passes[name].hi, rel=1e-4)
    # and the model the pass left behind is the smoothed one
    after = builders.run_ort(deferred_model, calibration)[0]
    assert np.allclose(after, builders.run_ort(ahead, calibration)[0], rtol=1e-4, atol=1e-3)


def test_a_smoothed_weights_sqnr_is_its_quantizations_not_the_smoothing():
    # the report compared the stored integers with the unsmoothed original weight (-3 dB on MiniLM);
    # a recorded SQNR is the one it keeps
    model, calibration = _block(), _data()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"},
                          min_params=0, smoothquant=0.5, bias_correction=False)
    # the 8-bit grid on every host (without VNNI a saturating layer would take 7 bits, 6 dB less)
    ctx = StepContext(original=original, calibration=calibration, options={"integer_weights": "int8"})
    result = quantize_static(model, params, ctx)
    assert result.metrics["smoothed_inputs"] == 2
    assert all(ctx.layers[w].extra["sqnr_db"] > 35 for w in ("Wq", "Wk", "W2"))
