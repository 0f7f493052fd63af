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
    ctc_agreement    1 - sum_i edit(dec(y_i), dec(z_i)) / sum_i max(|dec(y_i)|, |dec(z_i)|), where dec is
                     greedy CTC decoding (argmax per time step, repeats merged, ``blank`` dropped):
                     the text a recognizer reads, so a flip between blank and a repeated character
                     at a boundary, which top1_agreement counts, costs nothing (all empty: 1);
                     the ``trim`` classes are then dropped from both ends of each text (a line
                     recognizer's space: int4 GPTQ on PP-OCRv4's recognizer put a leading space on 2 of
                     8 lines, a drop of 0.02 in text that reads the same)

A drop measured on few samples is itself uncertain: one sample of 16 moves a per-sample score by
0.06, six budgets of 0.01. So a candidate meets the budget by its *drop bound* (``drop_bound``): the
BOUND_LEVEL quantile of the drop over bootstrap resamples of the evaluation samples (each resample
scores the original and the candidate on the same samples). On a few hundred samples the bound sits
a hair above the drop; on 8 or 16 it keeps the search from believing a lucky draw (the bench's quick
sets: 16 samples chose an all-MiniLM-L6-v2 whose task metric fell 0.023 below FP32's while the
search's own measure said 0.006).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from core.recipe import GoalSpec

BOUND_LEVEL = 0.9          # one-sided: the drop a resample exceeds one time in ten
RESAMPLES = 200
# spearman's resamples rank every pair again: 0.3 s at 128 samples, 4 s at 256 (a search verifies
# dozens of candidates); past 128 the bound is the drop (at 128 it was 0.001 above it, measured)
SPEARMAN_MAX_SAMPLES = 128


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks from 0 (ties share the mean of their positions)."""
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[group.reshape(-1)].astype(np.float64)


def _cosine_matrix(a: np.ndarray) -> np.ndarray:
    rows = _rows(a)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def _pairwise_cosine(a: np.ndarray) -> np.ndarray:
    return _cosine_matrix(a)[np.triu_indices(len(a), k=1)]


def _rank_correlation(sy: np.ndarray, sz: np.ndarray) -> float:
    if len(sy) < 2 or not np.isfinite(sz).all():
        return 0.0
    ry, rz = _ranks(sy), _ranks(sz)
    ry, rz = ry - ry.mean(), rz - rz.mean()
    denominator = math.sqrt(float(ry @ ry) * float(rz @ rz))
    return float(ry @ rz / denominator) if denominator > 0 else (1.0 if np.array_equal(sy, sz) else 0.0)


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
    if metric == "cosine" and not np.isfinite(_rows(z)).all():
        return 0.0
    if metric == "spearman":
        return _rank_correlation(_pairwise_cosine(y), _pairwise_cosine(z))
    parts = _per_sample(goal, y, z, labels)
    if parts is None:
        raise ValueError(f"unknown metric {metric!r}")
    _, (num, den) = parts            # the candidate's sums over every sample once
    return float(_ratio(num, den, np.arange(len(num))[None, :])[0])


def _per_sample(goal: GoalSpec, y: np.ndarray, z: np.ndarray, labels: np.ndarray | None):
    """(numerator, denominator) per sample for the metrics that are a ratio of sums over samples
    (a mean: denominator 1), the original's and the candidate's: quality(resample) =
    sum(num[idx]) / sum(den[idx]). None for spearman (pairs, not samples)."""
    metric, n = goal.metric, len(y)
    ones = np.ones(n)
    if metric == "cosine":
        a, b = _rows(y), _rows(z)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300))
        return (ones, ones), (cos, ones)
    if metric == "top1_agreement":
        same = np.argmax(np.asarray(y), axis=-1) == np.argmax(np.asarray(z), axis=-1)
        return (ones, ones), (same.reshape(n, -1).mean(axis=1), ones)
    if metric == "accuracy":
        def correct(out):
            p = np.argmax(np.asarray(out), axis=-1)
            p = p.reshape(n, -1)[:, 0] if p.ndim > 1 and p.size != len(labels) else p.reshape(-1)
            return (p == np.asarray(labels).reshape(-1)).astype(np.float64)
        return (correct(y), ones), (correct(z), ones)
    if metric in ("iou", "decision_agreement"):
        a = (np.asarray(y) > goal.threshold).reshape(n, -1)
        b = (np.asarray(z) > goal.threshold).reshape(n, -1)
        if metric == "decision_agreement":
            return (ones, ones), ((a == b).mean(axis=1), ones)
        union = np.count_nonzero(a | b, axis=1).astype(np.float64)
        own = np.count_nonzero(a, axis=1).astype(np.float64)
        return (own, own), (np.count_nonzero(a & b, axis=1).astype(np.float64), union)
    if metric == "rel_l2":
        a, b = _rows(y), _rows(z)
        return None if not np.isfinite(b).all() else ((a * a).sum(axis=1), ((b - a) ** 2).sum(axis=1))
    if metric == "ctc_agreement":
        read, found = (_trimmed(ctc_decode(out, goal.blank or 0), goal.trim) for out in (y, z))
        longer = np.array([max(len(r), len(f)) for r, f in zip(read, found)], dtype=np.float64)
        edits = np.array([Levenshtein.distance(r, f) for r, f in zip(read, found)], dtype=np.float64)
        return (longer, longer), (longer - edits, longer)
    return None


def ctc_decode(scores: np.ndarray, blank: int) -> list[list[int]]:
    """Greedy CTC decoding per sample: the argmax class per time step (every axis between the
    samples' and the classes' is time), runs of one class merged, blanks dropped."""
    scores = np.asarray(scores)
    best = np.argmax(scores.reshape(scores.shape[0], -1, scores.shape[-1]), axis=-1)
    previous = np.concatenate([np.full((best.shape[0], 1), -1, best.dtype), best[:, :-1]], axis=1)
    keep = (best != blank) & (best != previous)
    return [row[mask].tolist() for row, mask in zip(best, keep)]


def _trimmed(texts: list[list[int]], classes: Sequence[int]) -> list[list[int]]:
    """Each text without the given classes at its start and its end (those inside stay)."""
    if not classes:
        return texts
    edge = set(classes)
    out = []
    for text in texts:
        start, end = 0, len(text)
        while start < end and text[start] in edge:
            start += 1
        while end > start and text[end - 1] in edge:
            end -= 1
        out.append(text[start:end])
    return out


def _ratio(num: np.ndarray, den: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """sum(num[picks]) / sum(den[picks]) per resample row; 1 where the denominator is 0 (iou's empty union)."""
    top, bottom = num[picks].sum(axis=1), den[picks].sum(axis=1)
    return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), 1.0)


def drop_bound(goal: GoalSpec, y: np.ndarray, z: np.ndarray, labels: np.ndarray | None, drop: float) -> float:
    """The BOUND_LEVEL quantile of the drop over bootstrap resamples of the samples (module
    docstring); never below the measured ``drop``. Seeded: the same outputs give the same bound."""
    n = len(y)
    if n < 2 or not math.isfinite(drop):
        return drop
    picks = np.random.default_rng(0).integers(0, n, size=(RESAMPLES, n))
    if goal.metric == "spearman":
        if n > SPEARMAN_MAX_SAMPLES or not np.isfinite(z).all():
            return drop
        cy, cz = _cosine_matrix(y), _cosine_matrix(z)
        upper = np.triu_indices(n, k=1)
        drops = []
        for pick in picks:
            i, j = pick[upper[0]], pick[upper[1]]
            keep = i != j                      # a sample drawn twice is no pair
            drops.append(1.0 - _rank_correlation(cy[i[keep], j[keep]], cz[i[keep], j[keep]]))
        drops = np.asarray(drops)
    else:
        parts = _per_sample(goal, y, z, labels)
        if parts is None:
            return drop
        if goal.metric == "rel_l2":
            reference, error = parts
            drops = np.sqrt(_ratio(error, reference, picks))
        else:
            (o_num, o_den), (c_num, c_den) = parts
            drops = _ratio(o_num, o_den, picks) - _ratio(c_num, c_den, picks)
    return max(drop, float(np.quantile(drops, BOUND_LEVEL)))


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

    def bound(self, outputs: np.ndarray, drop: float) -> float:
        """The drop's bootstrap bound on these samples (``drop_bound``)."""
        return drop_bound(self.goal, self.reference, outputs, self.labels, drop)

    def meets(self, drop: float) -> bool:
        """Whether a drop (the bound, for a verdict) is within the budget."""
        return drop <= self.goal.max_drop + 1e-12


def stack_outputs(batches: Sequence[np.ndarray], batchable: bool) -> np.ndarray:
    """One array with samples on axis 0: batches concatenated, or single samples stacked."""
    if batchable:
        return np.concatenate([np.asarray(b) for b in batches], axis=0)
    return np.stack([np.asarray(b) for b in batches], axis=0)
