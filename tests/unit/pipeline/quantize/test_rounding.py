"""Calibrated weight rounding (issue #14): the output-error scale search (``scale_search: output``,
sequential MSE), AWQ activation-aware scales, and GPTQ's int4 defaults.

Oracles are computed here in numpy from the stored integers and scales: the layer's reconstruction
error on the calibration inputs ``||X (W' - W)||`` against round-to-nearest's, and the model's output
error on held-out data against plain RTN's."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply, dq_of
from worker.pipeline.quantize import awq, output_scales
from worker.pipeline.quantize.grid import expand


def correlated(count: int, k: int = 128, seed: int = 0, outliers: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Inputs with correlated channels of very different sizes (as a layer's real inputs have); the
    ``outliers`` channels 25x larger than the rest."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((k, k)) * np.logspace(0, -2, k)[:, None]
    x = rng.standard_normal((count, k)) @ mix * 3
    x[:, list(outliers)] *= 25.0
    return {"x": x.astype(np.float32)}


def dequantized(model: onnx.ModelProto, weight: str) -> np.ndarray:
    node, stored = dq_of(model, weight)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, block = attrs.get("axis"), attrs.get("block_size")
    q = stored["q"].astype(np.float32)
    scale = expand(stored["scale"], q.shape, axis if stored["scale"].ndim else None, block)
    zero = expand(stored.get("zero_point", np.zeros_like(stored["scale"], dtype=np.int32)), q.shape,
                  axis if stored["scale"].ndim else None, block)
    return (q - zero) * scale


def reconstruction_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) @ (w_hat - w)) / np.linalg.norm(x.astype(np.float64) @ w))


@pytest.mark.parametrize("weights", [
    {"bits": 4, "granularity": "block", "block_size": 32},
    {"bits": 4, "granularity": "channel"},
    {"bits": 8, "granularity": "channel"},
    {"bits": 4, "granularity": "block", "block_size": 32, "symmetric": False},
])
def test_output_scale_search_lowers_the_layers_reconstruction_error(weights):
    model = builders.mlp()
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W1")).astype(np.float32)
    calibration = correlated(256, seed=1)
    rtn, _ = apply(builders.mlp(), {"weights": weights})
    searched, ctx = apply(builders.mlp(), {"weights": {**weights, "scale_search": "output"}}, calibration=calibration)
    x = calibration["x"]
    rtn_error = reconstruction_error(x, w1, dequantized(rtn.model, "W1"))
    searched_error = reconstruction_error(x, w1, dequantized(searched.model, "W1"))
    assert searched_error < 0.97 * rtn_error, (searched_error, rtn_error)
    assert ctx.layers["W1"].extra["scale_search"] == "output" and ctx.layers["W1"].extra["method"] == "rtn"
    # the integers sit on the stored grid, as DequantizeLinear reads them
    _, stored = dq_of(searched.model, "W1")
    qmin, qmax = (-(2 ** (weights["bits"] - 1)), 2 ** (weights["bits"] - 1) - 1) if weights.get("symmetric", True) \
        else (0, 2 ** weights["bits"] - 1)
    assert stored["q"].min() >= qmin and stored["q"].max() <= qmax


def test_output_search_never_worse_than_its_start_and_per_tensor_shares_one_scale():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 64)) * np.logspace(0, -1.5, 64)
    h = (2.0 / len(x)) * x.T @ x
    w = rng.standard_normal((48, 64)).astype(np.float32)
    s0 = np.abs(w).max() / 7 * np.ones_like(w)
    zero = np.zeros(w.shape, dtype=np.int32)
    start = output_scales._rounded(w, s0, zero.astype(np.float32), -8, 7)
    shared = output_scales.search(w, h, s0, zero, None, True, -8, 7)
    assert np.unique(shared).size == 1
    assert output_scales.output_error(w, output_scales._rounded(w, shared, 0.0, -8, 7), h) <= \
        output_scales.output_error(w, start, h)
    groups = [np.arange(i, i + 16) for i in range(0, 64, 16)]
    blocked = output_scales.search(w, h, s0, zero, groups, False, -8, 7)
    assert all(np.unique(blocked[r, g]).size == 1 for r in range(48) for g in groups)   # one scale per block
    assert output_scales.output_error(w, output_scales._rounded(w, blocked, 0.0, -8, 7), h) < \
        output_scales.output_error(w, start, h)


def outlier_mlp(layernorm: bool) -> onnx.ModelProto:
    """x[batch, 128] -> [LayerNormalization with a few huge gamma channels ->] MatMul W (128 x 64) -> y.
    The LayerNorm's output is read by the MatMul alone (AWQ's 1/s folds into gamma and beta);
    without it the MatMul reads the graph input (a Mul is inserted)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((128, 64)) * 0.1).astype(np.float32)
    gamma = np.ones(128, np.float32)
    gamma[[3, 40, 77, 100]] = 30.0
    inits = [numpy_helper.from_array(w, "W")]
    nodes = []
    source = "x"
    if layernorm:
        inits += [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.full(128, 0.1, np.float32), "beta")]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], name="ln", axis=-1))
        source = "normed"
    nodes.append(helper.make_node("MatMul", [source, "W"], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("layernorm, method", [(True, "rtn"), (False, "rtn"), (False, "gptq")])
def test_awq_beats_plain_rtn_on_outlier_input_channels(layernorm, method):
    outliers = () if layernorm else (3, 40, 77, 100)
    calibration = correlated(256, seed=1, outliers=outliers)
    evaluation = correlated(128, seed=2, outliers=outliers)
    expected = builders.run_ort(outlier_mlp(layernorm), evaluation)
    weights = {"bits": 4, "granularity": "block", "block_size": 32}
    rtn, _ = apply(outlier_mlp(layernorm), {"weights": weights})
    scaled, ctx = apply(outlier_mlp(layernorm), {"weights": weights, "awq": True, "method": method},
                        calibration=calibration)
    rtn_error = builders.rel_l2(expected, builders.run_ort(rtn.model, evaluation))
    awq_error = builders.rel_l2(expected, builders.run_ort(scaled.model, evaluation))
    assert awq_error < 0.8 * rtn_error, (awq_error, rtn_error)
    found = scaled.metrics["awq"]
    source = "normed" if layernorm else "x"
    assert found["alpha"][source] > 0
    assert found["scaled_inputs"] == {source: "folded" if layernorm else "Mul"}
    ops = [n.op_type for n in scaled.model.graph.node]
    assert ("Mul" in ops) is not layernorm
    assert ctx.layers["W"].extra["awq_alpha"] == found["alpha"][source]
    assert ctx.layers["W"].extra["method"] == method


def test_awq_rescaling_is_exact_in_float():
    """s and 1/s cancel: the search's w' / s, put back against X / s, is the layer's product."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 32)) * np.logspace(0, 1, 32)
    mean_abs = np.abs(x).mean(axis=0)
    s = awq.factors(mean_abs, 0.5)
    w = rng.standard_normal((16, 32))
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-10)
    assert awq.factors(mean_abs, 0.0).tolist() == [1.0] * 32
    assert np.argmax(s) == np.argmax(mean_abs)
    np.testing.assert_allclose(s.max() * s.min(), 1.0)       # centred: sqrt(max * min) divided out


def test_gptq_low_bit_defaults_to_the_contracts_absmax_grid_without_awq():
    model = builders.mlp()
    calibration = correlated(256, seed=1)
    result, ctx = apply(model, {"weights": {"bits": 4, "granularity": "block"}, "method": "gptq"},
                        calibration=calibration)
    assert {r.extra["scale_search"] for r in ctx.layers.values()} == {"absmax"}
    assert "awq" not in result.metrics
    result, ctx = apply(builders.mlp(), {"weights": {"bits": 8}, "method": "gptq"}, calibration=calibration)
    assert {r.extra["scale_search"] for r in ctx.layers.values()} == {"absmax"}


@pytest.mark.parametrize("step, path", [
    ({"weights": {"bits": 8}, "activations": {}, "awq": True}, ["steps", 0, "awq"]),
    ({"weights": {"bits": 8}, "awq": True}, ["steps", 0, "awq"]),
    ({"weights": {"bits": 4, "scale_search": "output"}, "activations": {}}, ["steps", 0, "activations"]),
    ({"weights": {"bits": 1, "scale_search": "output"}}, ["steps", 0, "weights"]),
])
def test_refused_with_the_fields_path(step, path):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"steps": [{"op": "quantize", **step}]})
    assert caught.value.errors[0]["loc"] == path


def test_calibration_needed_at_the_field():
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4}, "awq": True},
                                     {"op": "quantize", "weights": {"bits": 4, "scale_search": "output"}}]})
    assert recipe.needs_calibration() == ["steps.0.awq", "steps.1.weights.scale_search"]
