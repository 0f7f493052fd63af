"""AWQ-style activation-aware scales for low-bit weight-only quantization (``quantize.awq``).

For the layers that read one activation ``X`` (``y_g = X W_g``; the Q, K and V projections of an
attention block share theirs) and a per-input-channel factor ``s[K] > 0``:

    y_g = (X diag(1/s)) (diag(s) W_g)      exact in float

and the quantized layer computes ``X diag(1/s) Q(diag(s) W_g)``. The input channels that carry the
largest activations get ``s > 1``: their weights take a larger share of each block's grid, so their
rounding error - which those activations multiply - shrinks relative to the rest (Lin et al., 2023,
"AWQ"). The factor:

    s = a ** alpha / sqrt(max(a ** alpha) * min(a ** alpha)),     a_k = mean |X_k|

(``a`` summed while the runner captures the layer's input Hessian, in the same pass), with
``alpha`` searched over ``ALPHAS`` for the smallest output error of the whole group on the
calibration data, from that Hessian:

    E(alpha) = sum_g sum_i D_gi H D_gi^T,     D_g = Q(W_g diag(s)) diag(1/s) - W_g      (matrix form)

``alpha = 0`` is ``s = 1`` (plain quantization), so the search never does worse than without AWQ on
the calibration data. ``Q`` in the search is round-to-nearest on the layer's grid (absmax / minmax
scales); GPTQ or a scale search then runs on the scaled weight with the scaled Hessian
``diag(1/s) H diag(1/s)``.

Where ``1/s`` goes, once every layer is quantized (``divide_inputs``): folded into the producer of
``X`` where that is exact (a LayerNormalization or a decomposed one's gamma and beta, when the group
reads ``X`` alone), else a ``Mul(X, 1/s)`` in front of the group (``quantize.smoothquant`` does the
same rewrite for static int8). Only MatMul and Gemm inputs are scaled: a Conv's input channels
reach many im2col columns, and its producer is seldom foldable.
"""
from __future__ import annotations

import numpy as np
import onnx

from worker.pipeline.quantize import smoothquant

ALPHAS = np.linspace(0.0, 1.0, 11)
FACTOR_RANGE = (1e-4, 1e4)


def factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s`` for one alpha from each input channel's mean |x| (see the module docstring); 1 for
    never-active inputs."""
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    live = mean_abs > 0
    s = np.ones(mean_abs.shape, dtype=np.float64)
    if not live.any() or alpha == 0.0:
        return s
    powered = mean_abs[live] ** alpha
    s[live] = powered / np.sqrt(powered.max() * powered.min())
    return np.clip(s, *FACTOR_RANGE)


def search(matrices: list[np.ndarray], hessian: np.ndarray, mean_abs: np.ndarray,
           quantizers: list) -> tuple[float, np.ndarray, float]:
    """(alpha, s, error) minimising the group's output error. ``matrices``: the group's weights in
    matrix form ``[outputs, K]``; ``mean_abs``: mean |x| per input channel; ``quantizers[i](matrix)
    -> w'``: round-to-nearest on layer i's grid."""
    h = np.asarray(hessian, dtype=np.float32)
    best: tuple[float, np.ndarray, float] | None = None
    for alpha in ALPHAS:
        s = factors(mean_abs, float(alpha)).astype(np.float32)
        error = 0.0
        for matrix, quantize in zip(matrices, quantizers):
            d = quantize(matrix * s) / s - matrix
            error += float(np.einsum("ij,ij->", d @ h, d, dtype=np.float64))
        if best is None or error < best[2]:
            best = (float(alpha), s, error)
    return best


def divide_inputs(model: onnx.ModelProto, tensor: str, nodes: list[onnx.NodeProto], weights: list[str],
                  s: np.ndarray) -> None:
    """``X -> X / s`` for ``nodes`` (which read ``tensor`` as their first input): folded into the
    producer where exact, else one Mul in front of them."""
    group = smoothquant.Group(tensor, nodes, weights)
    smoothquant.divide_input(model, group, (1.0 / s).astype(np.float32))


def eligible(node: onnx.NodeProto, weight: str, readers: dict) -> bool:
    """A MatMul / Gemm (transA 0) whose weight this node alone reads (``readers``: graph.consumers)."""
    return smoothquant.weight_rows_axis(node) is not None and len(readers.get(weight, [])) == 1
