"""The goal's metrics: the compressed model's chosen output against the original's on the same
evaluation samples (no labels needed, except for ``accuracy``).

Each metric gives a value and a *quality* where higher is better (``rel_l2``: minus the value), so
the budget reads the same for all: ``drop = quality(original) - quality(candidate) <= max_drop``.
The original's own quality is 1 for the agreement metrics, 0 for rel_l2, and its accuracy on the
labels for accuracy.

    top1_agreement   mean(argmax_last(y) == argmax_last(z)), per position for sequence outputs
    cosine           mean over samples of <y_i, z_i> / (|y_i| |z_i|)   (both zero: 1)
    rel_l2           |z - y| / |y| over the whole output
    iou              |{y > t} & {z > t}| / |{y > t} | {z > t}|          (both empty: 1)
    decision_agreement  mean((y > t) == (z > t))
    spearman         rank correlation between the pairwise cosine similarities of the samples'
                     outputs under y and under z (what retrieval with embeddings sees)
    accuracy         mean(argmax_last(z) == label)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from core.recipe import GoalSpec


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            if end - start > 1:
                ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def _pairwise_cosine(a: np.ndarray) -> np.ndarray:
    rows = _rows(a)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    sims = unit @ unit.T
    return sims[np.triu_indices(rows.shape[0], k=1)]


def value(goal: GoalSpec, y: np.ndarray, z: np.ndarray, labels: np.ndarray | None = None) -> float:
    """The metric of ``z`` (candidate) against ``y`` (original); for accuracy, of ``z`` against labels."""
    metric = goal.metric
    if metric == "rel_l2":
        y64, z64 = np.asarray(y, np.float64), np.asarray(z, np.float64)
        ref = float(np.linalg.norm(y64))
        diff = float(np.linalg.norm(z64 - y64))
        if not math.isfinite(diff):
            return math.inf
        return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
    if metric == "cosine":
        a, b = _rows(y), _rows(z)
        if not np.isfinite(b).all():
            return 0.0
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300))
        return float(np.mean(cos))
    if metric in ("top1_agreement", "accuracy"):
        pz = np.argmax(np.asarray(z), axis=-1)
        if metric == "top1_agreement":
            return float(np.mean(np.argmax(np.asarray(y), axis=-1) == pz))
        pz = pz.reshape(pz.shape[0], -1)[:, 0] if pz.ndim > 1 and pz.size != len(labels) else pz.reshape(-1)
        return float(np.mean(pz == np.asarray(labels).reshape(-1)))
    if metric in ("iou", "decision_agreement"):
        a, b = np.asarray(y) > goal.threshold, np.asarray(z) > goal.threshold
        if metric == "decision_agreement":
            return float(np.mean(a == b))
        union = int(np.count_nonzero(a | b))
        return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union
    if metric == "spearman":
        sy, sz = _pairwise_cosine(y), _pairwise_cosine(z)
        if len(sy) < 2 or not np.isfinite(sz).all():
            return 0.0
        ry, rz = _ranks(sy), _ranks(sz)
        ry, rz = ry - ry.mean(), rz - rz.mean()
        denominator = math.sqrt(float(ry @ ry) * float(rz @ rz))
        return float(ry @ rz / denominator) if denominator > 0 else (1.0 if np.array_equal(sy, sz) else 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def quality(goal: GoalSpec, metric_value: float) -> float:
    """Higher is better: the value, or minus it for rel_l2."""
    if goal.metric == "rel_l2":
        return -metric_value if math.isfinite(metric_value) else -math.inf
    return metric_value if math.isfinite(metric_value) else -math.inf


class Scorer:
    """The original's chosen output on a data set, and the quality of a candidate's outputs against it."""

    def __init__(self, goal: GoalSpec, reference: np.ndarray, labels: np.ndarray | None):
        self.goal, self.reference, self.labels = goal, reference, labels
        self.original_value = value(goal, reference, reference, labels)
        self.original_quality = quality(goal, self.original_value)

    def score(self, outputs: np.ndarray) -> tuple[float, float]:
        """(metric value, drop from the original's quality)."""
        found = value(self.goal, self.reference, outputs, self.labels)
        return found, self.original_quality - quality(self.goal, found)

    def meets(self, drop: float) -> bool:
        return drop <= self.goal.max_drop + 1e-12


def stack_outputs(batches: Sequence[np.ndarray], batchable: bool) -> np.ndarray:
    """One array with samples on axis 0: batches concatenated, or single samples stacked."""
    if batchable:
        return np.concatenate([np.asarray(b) for b in batches], axis=0)
    return np.stack([np.asarray(b) for b in batches], axis=0)
