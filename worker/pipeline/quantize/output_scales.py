"""Scales chosen for the layer's output, not its weights (``weights.scale_search: output``): a
sequential-MSE search of each output channel's (or block's) clip on calibration data.

For a layer ``y = x W`` in the matrix form GPTQ uses (``W[rows = outputs, cols = inputs]``) and the
input Hessian ``H = 2/n X^T X`` of the calibration rows, the layer's output error is a quadratic form
of the weight error ``D = W' - W``:

    ||X D^T||^2  =  n/2 * sum_i  D_i H D_i^T        (row i: one output channel)

Every candidate scale is ``c * s0`` (``s0`` the absmax / minmax scale, ``c`` in ``CANDIDATES``,
zero points unchanged: clipping ``[c lo, c hi]`` keeps ``z``), rounded to nearest on it.
- per channel (or per tensor): each row's ``D_i H D_i^T`` for every candidate, the smallest kept;
- per block (blocks of ``B`` inputs): the rows' errors couple the blocks through ``H``'s
  off-diagonal, so the blocks are visited in turn (``SWEEPS`` passes of coordinate descent), each
  block's candidate chosen with the others fixed:
      e_b(c) = D_b(c) H_bb D_b(c)^T + 2 D_b(c) . G_b,     G_b = (D H)[:, b] - D_b H_bb
  which never raises the row's total error (the current candidate is among those tried).
Candidate ``c = 1`` is ``s0`` itself, so the result is never worse than absmax / minmax on the
calibration data. "Sequential": the runner (``quantize.gptq``) carries the calibration samples
through the model quantized so far, so each layer's ``H`` is that of the inputs it will really see.
"""
from __future__ import annotations

import numpy as np

CANDIDATES = np.linspace(0.5, 1.0, 26)[::-1]      # clip fractions of the absmax / minmax scale, 1 first
SWEEPS = 2


def _rounded(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """``w'`` by round-half-to-even onto the grid ``(s, z)`` (broadcast), as DequantizeLinear computes it."""
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.clip(np.rint(w / safe) + z, qmin, qmax)
    return np.where(s > 0, (q - z) * s, np.float32(0.0)).astype(np.float32)


def search(matrix: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
           column_groups: list[np.ndarray] | None, shared: bool, qmin: int, qmax: int) -> np.ndarray:
    """The per-element scales (``matrix``'s shape, constant where ``scale`` shares one parameter)
    minimising the output error. ``scale`` / ``zero_point``: the absmax / minmax grid, one value per
    element. ``column_groups``: the columns each block spans (the same for every row), None for
    one scale per row (per channel), ``shared`` for one scale for the whole tensor."""
    matrix = np.asarray(matrix, dtype=np.float32)
    h = np.asarray(hessian, dtype=np.float32)
    z = zero_point.astype(np.float32)
    rows = matrix.shape[0]
    if column_groups is None:
        best_err = np.full(1 if shared else rows, np.inf)
        best_c = np.ones(rows, dtype=np.float32)
        for c in CANDIDATES:
            d = _rounded(matrix, scale * np.float32(c), z, qmin, qmax) - matrix
            err = np.einsum("ij,ij->i", d @ h, d, dtype=np.float64)
            if shared:
                err = err.sum(keepdims=True)
            better = err < best_err
            best_err[better] = err[better]
            best_c[np.broadcast_to(better, (rows,))] = c
        return (scale * best_c[:, None]).astype(np.float32)
    chosen = np.ones(matrix.shape, dtype=np.float32)
    d = _rounded(matrix, scale, z, qmin, qmax) - matrix
    candidates = CANDIDATES.astype(np.float32)[:, None, None]
    for _ in range(SWEEPS):
        for cols_b in column_groups:
            h_bb = h[np.ix_(cols_b, cols_b)]
            w_b, s_b, z_b = matrix[:, cols_b], scale[:, cols_b], z[:, cols_b]
            rest = d @ h[:, cols_b] - d[:, cols_b] @ h_bb       # the other blocks' coupling
            d_all = _rounded(w_b, s_b * candidates, z_b, qmin, qmax) - w_b      # [candidates, rows, B]
            err = np.einsum("crj,crj->cr", d_all @ h_bb + 2.0 * rest, d_all)
            best = np.argmin(err, axis=0)                        # first (largest c) on ties
            rows_index = np.arange(rows)
            d[:, cols_b] = d_all[best, rows_index]
            chosen[:, cols_b] = CANDIDATES.astype(np.float32)[best][:, None]
    return (scale * chosen).astype(np.float32)


def output_error(matrix: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """``sum_i D_i H D_i^T`` (the layer's output error on the calibration data, up to n/2)."""
    d = (np.asarray(w_hat, dtype=np.float64) - matrix)
    return float(np.einsum("ij,ij->", d @ np.asarray(hessian, dtype=np.float64), d))
