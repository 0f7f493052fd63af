"""The activation range that minimises the expected 8-bit quantization error (calibration ``mse``).

Given a tensor's histogram (counts ``n_i`` at bin centres ``c_i``) and a candidate range
``[lo, hi]`` holding 0, an asymmetric grid of ``levels`` values has step ``d = (hi - lo) / (levels - 1)``
and the expected squared error is

    E(lo, hi) = sum_{lo <= c_i <= hi} n_i d^2 / 12  +  sum_{c_i outside} n_i (c_i - clamp(c_i))^2

(rounding noise inside, clipping error outside; exact zeros cost nothing, 0 being on every grid).
Minmax spends the grid on the rare extremes of long-tailed activations (GELU outputs, a
transformer's LayerNorm outputs, a detector's pre-sigmoid logits); a fixed percentile clips
without looking at what clipping costs. This search weighs both, per tensor, from the histogram
the calibration pass already keeps: no extra pass over the data.

The search is over ``CANDIDATES`` fractions of each side's extreme, alternating the two sides
(the cost is separable but for the shared step), a few rounds.
"""
from __future__ import annotations

import numpy as np

CANDIDATES = 200
ROUNDS = 3


def _cost(centres: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """E(lo, hi) for broadcast candidate arrays ``lo`` / ``hi`` (shape [k, 1]) -> [k]."""
    step = (hi - lo) / (levels - 1)
    inside = (centres >= lo) & (centres <= hi)
    clipped = np.where(centres > hi, centres - hi, np.where(centres < lo, centres - lo, 0.0))
    return (np.where(inside, step ** 2 / 12.0, clipped ** 2) * counts).sum(axis=-1)


def mse_range(counts: np.ndarray, radius: float, zeros: int, lo: float, hi: float, levels: int = 256) -> tuple[float, float]:
    """The ``[lo', hi']`` within the seen ``[lo, hi]`` (``lo <= 0 <= hi``) minimising E for a histogram
    of ``counts`` over ``[-radius, radius]``, ``zeros`` of whose values were exact zeros."""
    counts = np.asarray(counts, dtype=np.float64).copy()
    bins = counts.shape[0]
    if radius <= 0 or not counts.any() or hi <= lo:
        return lo, hi
    edges = np.linspace(-radius, radius, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    counts[np.searchsorted(edges, 0.0, side="right") - 1] -= min(zeros, counts[bins // 2])
    live = counts > 0
    centres, counts = centres[live], counts[live]
    if not counts.size:
        return lo, hi
    fractions = np.linspace(1.0 / CANDIDATES, 1.0, CANDIDATES)[:, None]
    best_lo, best_hi = lo, hi
    for _ in range(ROUNDS):
        if best_hi > 0:
            candidates = hi * fractions
            best_hi = float(candidates[:, 0][np.argmin(_cost(centres, counts, np.full_like(candidates, best_lo),
                                                       candidates, levels))])
        if best_lo < 0:
            candidates = lo * fractions
            best_lo = float(candidates[:, 0][np.argmin(_cost(centres, counts, candidates,
                                                       np.full_like(candidates, best_hi), levels))])
    return best_lo, best_hi
