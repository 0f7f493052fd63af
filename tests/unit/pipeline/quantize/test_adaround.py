"""Learned rounding (``weights.rounding: adaround``, ``quantize.adaround``; issue #14).

Oracle: the layer's output error ``||X (W' - W)||`` on its inputs, computed here in numpy from the
stored integers and scales, against round-to-nearest's on the same grid; and each learned integer
is the floor or the ceiling of ``w / s`` (a rounding choice, not a different grid)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from core.errors import RecipeError
from core.recipe import QuantizeStep, parse_recipe
from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply
from tests.unit.pipeline.quantize.test_rounding import correlated, dequantized, reconstruction_error
from worker.pipeline.quantize import adaround
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext


def _layer(rows: int = 48, cols: int = 96, seed: int = 0):
    """A layer's weight and inputs as a trained layer meets them: correlated input channels of very
    different sizes, weights with a few large values."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) * np.logspace(0, -2, cols)[:, None]
    x = (rng.standard_normal((600, cols)) @ mix * 3).astype(np.float32)
    w = (rng.standard_t(4, (rows, cols)) * 0.05).astype(np.float32)
    return w, x


@pytest.mark.parametrize("bits", [8, 4])
def test_learned_rounding_lowers_the_layers_output_error_on_held_out_inputs(bits):
    w, x = _layer()
    fit, held_out = x[:400], x[400:]
    h = (2.0 / len(fit)) * fit.T.astype(np.float64) @ fit
    qmax = (1 << (bits - 1)) - 1
    s = np.broadcast_to(np.abs(w).max(axis=1, keepdims=True) / qmax, w.shape).astype(np.float32)
    z = np.zeros(w.shape, np.float32)
    q, info = adaround.optimise(w, h, s, z, -qmax - 1, qmax, iterations=200)
    nearest = np.clip(np.rint(w / s), -qmax - 1, qmax)
    assert info["kept"] and q.min() >= -qmax - 1 and q.max() <= qmax
    assert np.all((q == np.floor(w / s)) | (q == np.floor(w / s) + 1) | (q == nearest))
    assert (q != nearest).mean() > 0.01                  # it did change choices
    error = np.linalg.norm(held_out @ ((q * s) - w).T)
    nearest_error = np.linalg.norm(held_out @ ((nearest * s) - w).T)
    assert error < 0.8 * nearest_error, (error, nearest_error)
    assert info["error"] < info["nearest_error"]


def test_nothing_to_choose_keeps_nearest():
    w = np.array([[0.0, 1.0, -1.0, 0.5]], np.float32)
    s = np.full(w.shape, 0.5, np.float32)            # every w / s an integer: nearest is exact
    q, info = adaround.optimise(w, np.eye(4), s, np.zeros_like(s), -128, 127, iterations=20)
    assert q.tolist() == [[0, 2, -2, 1]] and not info["kept"]


@pytest.mark.parametrize("weights", [
    {"bits": 4, "granularity": "block", "block_size": 32},
    {"bits": 8, "granularity": "channel"},
])
def test_weight_only_adaround_beats_nearest_on_the_layer(weights):
    calibration = correlated(256, seed=1)
    w1 = next(numpy_helper.to_array(t) for t in builders.mlp().graph.initializer if t.name == "W1").astype(np.float32)
    nearest, _ = apply(builders.mlp(), {"weights": weights})
    learned, ctx = apply(builders.mlp(), {"weights": {**weights, "rounding": "adaround"}}, calibration=calibration)
    x = correlated(128, seed=2)["x"]
    nearest_error = reconstruction_error(x, w1, dequantized(nearest.model, "W1"))
    learned_error = reconstruction_error(x, w1, dequantized(learned.model, "W1"))
    assert learned_error < 0.9 * nearest_error, (learned_error, nearest_error)
    record = ctx.layers["W1"].extra["rounding"]
    assert record["method"] == "adaround" and record["output_error_vs_nearest"] < 1.0


def test_static_int8_adaround_lowers_the_model_output_error():
    model = builders.mlp()
    calibration = correlated(256, seed=1)
    evaluation = correlated(128, seed=2)
    expected = builders.run_ort(model, evaluation)
    fields = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}, "min_params": 0,
              "min_products": 0, "bias_correction": False}
    errors = {}
    for rounding in ("nearest", "adaround"):
        ctx = StepContext(original=model, calibration=calibration)
        params = QuantizeStep(**{**fields, "weights": {"bits": 8, "rounding": rounding}})
        result = quantize_static(model, params, ctx)
        errors[rounding] = builders.rel_l2(expected, builders.run_ort(result.model, evaluation))
        if rounding == "adaround":
            assert result.metrics["adarounded_layers"] >= 1
            assert ctx.layers["W1"].extra["rounding"]["method"] == "adaround"
    assert errors["adaround"] < errors["nearest"], errors


@pytest.mark.parametrize("step, path", [
    ({"weights": {"bits": 4, "rounding": "adaround"}, "method": "gptq"}, ["steps", 0]),
    ({"weights": {"bits": 1, "rounding": "adaround"}}, ["steps", 0, "weights"]),
    ({"weights": {"bits": 8, "rounding": "adaround"}, "activations": {"calibration": "dynamic"}}, ["steps", 0]),
    ({"weights": {"bits": 8, "rounding": "up"}}, ["steps", 0, "weights", "rounding"]),
])
def test_refused_with_the_fields_path(step, path):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"steps": [{"op": "quantize", **step}]})
    assert caught.value.errors[0]["loc"] == path


def test_weight_only_adaround_needs_calibration_at_the_field():
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4, "rounding": "adaround"}}]})
    assert recipe.needs_calibration() == ["steps.0.weights.rounding"]
