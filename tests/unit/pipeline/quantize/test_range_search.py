"""quantize.range_search (calibration ``mse``): on a long-tailed activation the searched range gives a
lower 8-bit quantization error than the full range (minmax) and than a fixed percentile."""
from __future__ import annotations

import numpy as np

from worker.pipeline import calibrate


def _fake_quantize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def test_mse_range_beats_minmax_and_percentile_on_a_long_tail():
    rng = np.random.default_rng(0)
    # GELU-like: most values in [-0.17, 2], a rare tail out to ~25 (a transformer's FFN activations)
    x = np.concatenate([rng.standard_normal(200_000) * 0.6, rng.exponential(4.0, 200)]).astype(np.float32)
    x = np.where(x < 0, -0.17 * (1 - np.exp(x)), x).astype(np.float32)
    statistics = calibrate.ActivationStatistics(["t"])
    for chunk in np.array_split(x, 8):
        statistics.update("t", chunk)
    errors = {}
    for method in ("minmax", "percentile", "mse"):
        found = statistics.range("t", method)
        errors[method] = float(((_fake_quantize(x, found.lo, found.hi) - x) ** 2).mean())
    assert errors["mse"] < 0.9 * errors["minmax"]
    assert errors["mse"] < errors["percentile"]
    found = statistics.range("t", "mse")
    assert found.lo <= 0.0 <= found.hi
