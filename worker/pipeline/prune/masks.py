"""Exact-count pruning masks over one or many score arrays, built on the kernels' selection.

``kernels.magnitude_mask`` keeps ``score > t`` with ``t`` the k-th smallest score, so ties at ``t``
(most often weights that are already zero) would prune more than k elements. ``exact_masks``
returns exactly ``k`` zeros in total by keeping back the surplus among the tied elements, in index
order, so a requested sparsity is met exactly per the contract's counting.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import kernels


def exact_masks(scores: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Boolean masks (True = kept) with exactly ``k`` False over all ``scores`` together, the k
    smallest scores pruned. Scores are non-negative float32 arrays."""
    total = sum(s.size for s in scores)
    if k <= 0:
        return [np.ones(s.shape, dtype=bool) for s in scores]
    if k >= total:
        return [np.zeros(s.shape, dtype=bool) for s in scores]
    arrays = [np.ascontiguousarray(s, dtype=np.float32) for s in scores]
    threshold = kernels.kth_smallest_abs(arrays, k)
    masks = [kernels.magnitude_mask(a, threshold).astype(bool) for a in arrays]
    surplus = sum(m.size - int(np.count_nonzero(m)) for m in masks) - k
    for array, mask in zip(arrays, masks):
        if surplus <= 0:
            break
        flat_mask = mask.reshape(-1)
        tied = np.flatnonzero(~flat_mask & (array.reshape(-1) == np.float32(threshold)))[:surplus]
        flat_mask[tied] = True
        surplus -= tied.size
    return masks


def normalized_scores(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """|w| / ||W||_F per layer. Pruning the smallest of these globally minimises the sum over layers of
    the relative squared error ||W - W_pruned||^2 / ||W||^2 for a total number of pruned weights: a
    layer whose relative error grows fastest per pruned weight (few, large weights) keeps more."""
    out = []
    for w in weights:
        w32 = np.asarray(w, dtype=np.float32)
        norm = float(np.sqrt(np.sum(np.square(w32, dtype=np.float64))))
        out.append(np.abs(w32) / np.float32(norm) if norm > 0 else np.abs(w32))
    return out
