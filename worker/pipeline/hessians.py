"""Input Hessians of layers on calibration data: ``H = 2/n X^T X`` of what a layer multiplies its
weight with (a Conv's input unfolded to receptive fields), for every layer in one pass over the data.
SparseGPT prunes with it, data-aware low-rank factorizes with it."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Hashable

import numpy as np
import onnx

from worker.pipeline import activations
from worker.pipeline.data import Dataset
from worker.pipeline.sequential import lockstep
from worker.pipeline.unfold import unfold2d

CALIBRATION_BATCH = 64
DAMPING = 0.01          # relative to mean(diag H), as SparseGPT / GPTQ damp


def capture_hessians(model: onnx.ModelProto, data: Dataset,
                     plans: dict[str, list[tuple[Hashable, int, dict | None]]]) -> dict[Hashable, np.ndarray]:
    """``plans``: input tensor -> [(key, columns, conv geometry or None)]. Returns key -> H float64."""
    hessians = {key: np.zeros((columns, columns)) for group in plans.values() for key, columns, _ in group}
    rows = {key: 0 for key in hessians}
    sources = list(plans)
    for batch in activations.capture(model, data, sources, batch_size=CALIBRATION_BATCH):
        for source in sources:
            x = batch[source]
            for key, columns, geometry in plans[source]:
                flat = unfold2d(x, geometry) if geometry is not None else x.reshape(-1, columns)
                flat = flat.astype(np.float64)
                hessians[key] += flat.T @ flat
                rows[key] += flat.shape[0]
    for key, count in rows.items():
        if count:
            hessians[key] *= 2.0 / count
    return hessians


def damped(hessian: np.ndarray) -> np.ndarray:
    """H with never-active inputs (diag 0) given a unit diagonal, plus DAMPING * mean(diag H) * I."""
    hessian = hessian.copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices_from(hessian)] += DAMPING * float(np.mean(np.diag(hessian)))
    return hessian


def inverse_upper_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper triangular ``U`` with ``U^T U = H^-1`` (what SparseGPT and GPTQ sweep with), from one
    Cholesky factorization and one triangular inverse: with ``J`` the reversal, the Cholesky factor
    of ``J H J`` flipped back is an upper ``U'`` with ``H = U' U'^T``, so ``U = U'^-1``. The usual
    route (Cholesky, inverse, product, Cholesky again) costs ~3x the arithmetic. float64: the
    Cholesky of a calibration Hessian is where the precision is needed. Raises LinAlgError where H
    is not positive definite."""
    flipped = np.linalg.cholesky(np.asarray(hessian, dtype=np.float64)[::-1, ::-1])
    upper = np.ascontiguousarray(flipped[::-1, ::-1])
    return np.triu(np.linalg.inv(upper))


def capture_drift(original: onnx.ModelProto, current: onnx.ModelProto, data: Dataset,
                  plans: dict[str, list[tuple[Hashable, int, dict | None]]]) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """For layers whose inputs changed because earlier layers were compressed: ``(H, C)`` with
    ``H = 2/n X~^T X~`` of the current model's input X~ and ``C = 2/n X^T X~`` against the original
    model's input X on the same samples."""
    found = {key: [np.zeros((columns, columns)), np.zeros((columns, columns)), 0]
             for group in plans.values() for key, columns, _ in group}
    sources = list(plans)
    pairs = zip(activations.capture(original, data, sources, batch_size=CALIBRATION_BATCH),
                activations.capture(current, data, sources, batch_size=CALIBRATION_BATCH))
    for before, after in pairs:
        for source in sources:
            for key, columns, geometry in plans[source]:
                x = unfold2d(before[source], geometry) if geometry is not None else before[source].reshape(-1, columns)
                x_now = unfold2d(after[source], geometry) if geometry is not None else after[source].reshape(-1, columns)
                x, x_now = x.astype(np.float64), x_now.astype(np.float64)
                found[key][0] += x_now.T @ x_now
                found[key][1] += x.T @ x_now
                found[key][2] += x.shape[0]
    return {key: (h * 2.0 / max(n, 1), c * 2.0 / max(n, 1)) for key, (h, c, n) in found.items()}


def drift_corrected(matrix: np.ndarray, hessian: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The weights ``M'`` (rows = outputs) that best reproduce the original outputs ``X M^T`` from
    the drifted inputs ``X~``, ridge-pulled towards M: ``min ||X M^T - X~ M'^T||^2 + lam ||M' - M||^2``
    gives ``M' = M (C + lam I)(H + lam I)^-1`` (``lam`` the usual damping), which is M itself when
    the inputs did not drift (C = H)."""
    lam = DAMPING * float(np.mean(np.diag(hessian))) or DAMPING
    size = hessian.shape[0]
    regularized = hessian + lam * np.eye(size)
    return np.linalg.solve(regularized, (cross + lam * np.eye(size)).T @ matrix.T).T


def gram(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``a^T b`` (``a^T a`` without ``b``) of one batch's rows in float32 BLAS, returned as float64
    for the running sum: per batch the float32 product's relative error stays ~1e-6, and summing
    the batches in float64 keeps it there however many batches come (a float64 product of the same
    rows costs twice the time and copies them twice the size)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if b is None:
        return (a.T @ a).astype(np.float64)
    return (a.T @ np.ascontiguousarray(b, dtype=np.float32)).astype(np.float64)


UNFOLD_BYTES = 64 << 20     # a Conv input is unfolded (im2col) at most this much at a time


def _chunks(x: np.ndarray, columns: int, geometry: dict | None) -> list[tuple[int, int]]:
    """Sample ranges of ``x`` whose unfolded rows stay within UNFOLD_BYTES (a 3x3 Conv over 96
    channels at 120 x 120 unfolds to 50 MB per image: a batch of 16 was 0.8 GB at once)."""
    if geometry is None or x.ndim < 1 or x.shape[0] <= 1:
        return [(0, x.shape[0] if x.ndim else 1)]
    per_sample = max(int(np.prod(x.shape[2:])) * columns * 4, 1)
    step = max(1, UNFOLD_BYTES // per_sample)
    return [(start, min(start + step, x.shape[0])) for start in range(0, x.shape[0], step)]


ROWS_PER_SAMPLE = 4096      # receptive fields per sample a Conv's Hessian takes (evenly strided)


def _rows(x: np.ndarray, columns: int, geometry: dict | None) -> np.ndarray:
    """The layer's input rows; a Conv's receptive fields, every k-th where one sample has more than
    ROWS_PER_SAMPLE of them. A 3 x 3 Conv over 96 channels at 120 x 120 has 14400 fields of 864
    columns per image: on 16 images H alone is 340 GFLOP, where a quarter of the fields (still 67x
    the columns) gives the same H to within sampling noise. Row ranks and MatMul rows are all kept."""
    if geometry is None:
        return x.reshape(-1, columns)
    rows = unfold2d(x, geometry)
    per_sample = rows.shape[0] // max(x.shape[0], 1)
    stride = -(-per_sample // ROWS_PER_SAMPLE)
    return rows[::stride] if stride > 1 else rows


def _timed(batches, cost, name: str):
    """The batches of a propagation, with the time spent producing them counted as ``name``."""
    iterator = iter(batches)
    while True:
        if cost is None:
            item = next(iterator, None)
        else:
            with cost.phase(name):
                item = next(iterator, None)
        if item is None:
            return
        yield item


def accumulate_hessians(batches, plans: dict[str, list[tuple[Hashable, int, dict | None]]],
                        cost=None) -> dict[Hashable, np.ndarray]:
    """``capture_hessians`` over batches a propagation streams (``{source: value}`` per batch)."""
    hessians = {key: np.zeros((columns, columns)) for group in plans.values() for key, columns, _ in group}
    rows = {key: 0 for key in hessians}
    for batch in _timed(batches, cost, "capture"):
        with cost.phase("statistics") if cost is not None else nullcontext():
            for source, group in plans.items():
                for key, columns, geometry in group:
                    x = batch[source]
                    for start, stop in _chunks(x, columns, geometry):
                        flat = _rows(x[start:stop] if geometry is not None else x, columns, geometry)
                        hessians[key] += gram(flat)
                        rows[key] += flat.shape[0]
    for key, count in rows.items():
        if count:
            hessians[key] *= 2.0 / count
    return hessians


def accumulate_drift(reference, current, plans: dict[str, list[tuple[Hashable, int, dict | None]]],
                     cost=None) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """``capture_drift`` over two propagations in lockstep: the original model's (``reference``)
    and the one being changed (``current``), on the same samples."""
    found = {key: [np.zeros((columns, columns)), np.zeros((columns, columns)), 0]
             for group in plans.values() for key, columns, _ in group}
    for before, after in _timed(lockstep(reference, current), cost, "capture"):
        with cost.phase("statistics") if cost is not None else nullcontext():
            for source, group in plans.items():
                for key, columns, geometry in group:
                    a, b = before[source], after[source]
                    for start, stop in _chunks(a, columns, geometry):
                        part = slice(start, stop) if geometry is not None else slice(None)
                        x, x_now = _rows(a[part], columns, geometry), _rows(b[part], columns, geometry)
                        found[key][0] += gram(x_now)
                        found[key][1] += gram(x, x_now)
                        found[key][2] += x.shape[0]
    return {key: (h * 2.0 / max(n, 1), c * 2.0 / max(n, 1)) for key, (h, c, n) in found.items()}


def log_propagation(log, *propagations) -> None:
    """What the propagations cost, for the step's metrics: sessions built, restarts, spilled batches."""
    log.extra["propagation"] = [{"segments": p.stats.segments, "nodes": p.stats.nodes, "restarts": p.stats.restarts,
                        "spilled_batches": p.stats.spilled,
                        "peak_held_bytes": max(p.stats.held_bytes, default=0)} for p in propagations]
