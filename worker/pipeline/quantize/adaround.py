"""Learned rounding of a layer's weights (``weights.rounding: adaround``; Nagel et al., 2020, "Up or
Down? Adaptive Rounding for Post-Training Quantization"), on the layer's calibration Hessian.

Each weight may go down or up from ``x = w / s``: ``q = floor(x) + z + h``, ``h`` in {0, 1}. Round to
nearest picks ``h`` per weight alone; the layer's *output* error couples them. In the matrix form
GPTQ uses (``W[rows = outputs, cols = inputs]``, ``H = 2/n X^T X`` of the calibration inputs) that
error is a quadratic form of the weight error ``D = W' - W`` (``quantize.output_scales``):

    E(h) = sum_i D_i H D_i^T,      D = s * (floor(x) + h - x)

AdaRound relaxes ``h`` to the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
and minimises

    E(h(V)) / E_nearest  +  LAMBDA * mean(1 - |2 h(V) - 1|^beta)

by Adam on ``V`` (all rows at once: one ``D H`` product per iteration), the regulariser off for the
first ``WARMUP`` of the iterations, then with ``beta`` annealed from 20 to 2 so that every ``h`` is
pushed to 0 or 1. ``V`` starts where ``h(V)`` is the fractional part of ``x``, i.e. at ``w`` itself.
The result is ``h >= 0.5`` rounded, and it is kept only if its exact error ``E`` is below round to
nearest's (so on the calibration data it is never worse). Values a grid clamps (``floor(x) + 1 + z``
above qmax) have one choice and stay put.

Cost: ``ITERATIONS`` products ``[rows, cols] x [cols, cols]`` per layer, a few hundred times GPTQ's
solve; the sequential runner (``quantize.gptq.GptqRunner(rounding="adaround")``) supplies each
layer's Hessian of the inputs it sees with the layers before it already quantized.
"""
from __future__ import annotations

import numpy as np

ITERATIONS = 300
LEARNING_RATE = 0.1
LAMBDA = 3.0                 # the regulariser's weight against the normalised reconstruction error (chosen on
                             # correlated synthetic inputs: 0.05 -> 0.69, 0.5 -> 0.26, 3 -> 0.17 of nearest's error)
WARMUP = 0.2                 # share of the iterations with the regulariser off
BETA = (20.0, 2.0)           # annealed start and end of the regulariser's exponent
ZETA, GAMMA = 1.1, -0.1      # the rectified sigmoid's stretch (the paper's values)
_ADAM = (0.9, 0.999, 1e-8)


def _soft(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(V) and dh/dV (0 where the clip is active)."""
    sigma = 1.0 / (1.0 + np.exp(-v))
    stretched = sigma * (ZETA - GAMMA) + GAMMA
    slope = np.where((stretched > 0.0) & (stretched < 1.0), (ZETA - GAMMA) * sigma * (1.0 - sigma), 0.0)
    return np.clip(stretched, 0.0, 1.0), slope


def quadratic_error(d: np.ndarray, hessian: np.ndarray) -> float:
    """``sum_i D_i H D_i^T``: the layer's output error on the calibration data (up to n/2)."""
    d = np.asarray(d, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ np.asarray(hessian, dtype=np.float64), d))


def optimise(matrix: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
             qmin: int, qmax: int, iterations: int = ITERATIONS) -> tuple[np.ndarray, dict]:
    """The stored integers ``q`` (``matrix``'s shape, int32) for the grid ``(scale, zero_point)`` (one
    value per element, matrix layout), and what the search did: the nearest and the learned output
    errors, and whether the learned rounding was kept."""
    w = np.asarray(matrix, dtype=np.float32)
    h_mat = np.asarray(hessian, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    live = s > 0
    safe = np.where(live, s, np.float32(1.0))
    x = w / safe
    nearest = np.clip(np.rint(x) + z, qmin, qmax)
    lower = np.clip(np.floor(x) + z, qmin, qmax)
    upper = np.clip(np.floor(x) + 1.0 + z, qmin, qmax)
    step = np.where(live, (upper - lower) * s, np.float32(0.0))          # 0: one choice only
    base = np.where(live, (lower - z) * s, np.float32(0.0)) - w           # D at h = 0

    def error_of(q: np.ndarray) -> float:
        return quadratic_error(np.where(live, (q - z) * s, 0.0) - w, h_mat)

    e_nearest = error_of(nearest)
    info = {"nearest_error": e_nearest, "error": e_nearest, "kept": False}
    if e_nearest <= 0.0 or not np.any(step > 0):
        return nearest.astype(np.int32), info
    frac = np.clip(x - np.floor(x), 1e-3, 1.0 - 1e-3)
    p = (frac - GAMMA) / (ZETA - GAMMA)
    v = np.log(p / (1.0 - p)).astype(np.float32)
    m, u = np.zeros_like(v), np.zeros_like(v)
    beta1, beta2, eps = _ADAM
    norm = np.float32(1.0 / e_nearest)
    count = np.float32(1.0 / v.size)
    start = int(WARMUP * iterations)
    for t in range(1, iterations + 1):
        h, slope = _soft(v)
        d = base + h * step
        grad = (2.0 * norm) * (d @ h_mat) * step                        # dE/dh, normalised
        if t > start:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (t - start) / max(iterations - start, 1)
            centred = 2.0 * h - 1.0
            magnitude = np.abs(centred)
            grad = grad - (LAMBDA * count * beta * 2.0) * np.sign(centred) * magnitude ** (beta - 1.0)
        grad = (grad * slope).astype(np.float32)
        m = beta1 * m + (1.0 - beta1) * grad
        u = beta2 * u + (1.0 - beta2) * grad * grad
        v -= LEARNING_RATE * (m / (1.0 - beta1 ** t)) / (np.sqrt(u / (1.0 - beta2 ** t)) + eps)
    h, _ = _soft(v)
    learned = np.where(h >= 0.5, upper, lower)
    e_learned = error_of(learned)
    if e_learned < e_nearest:
        info.update(error=e_learned, kept=True)
        return learned.astype(np.int32), info
    return nearest.astype(np.int32), info


def record(info: dict) -> dict:
    """What the search did to one layer, for its report record (``layers[].extra.rounding``)."""
    ratio = info["error"] / info["nearest_error"] if info["nearest_error"] else 1.0
    return {"method": "adaround" if info["kept"] else "nearest (adaround did not lower the output error)",
            "output_error_vs_nearest": round(float(ratio), 4)}
