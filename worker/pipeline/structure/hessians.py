"""Input Hessians of layers on calibration data: ``H = 2/n X^T X`` of what a layer multiplies its
weight with (a Conv's input unfolded to receptive fields), for every layer in one pass over the data.
SparseGPT prunes with it, data-aware low-rank factorizes with it."""
from __future__ import annotations

from typing import Hashable

import numpy as np
import onnx

from worker.pipeline import activations
from worker.pipeline.data import Dataset
from worker.pipeline.structure.unfold import unfold2d

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
