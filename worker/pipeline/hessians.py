"""Input Hessians of layers on calibration data: ``H = 2/n X^T X`` of what a layer multiplies its
weight with (a Conv's input unfolded to receptive fields), for every layer in one pass over the data.
SparseGPT prunes with it, data-aware low-rank factorizes with it."""
from __future__ import annotations

from typing import Hashable

import numpy as np
import onnx

from worker.pipeline import activations
from worker.pipeline.data import Dataset
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
