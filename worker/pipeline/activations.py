"""Intermediate tensors of a model on data: what a layer sees, for Hessians (GPTQ, SparseGPT),
calibration ranges and layer-wise reconstruction.

ONNX Runtime runs the model with the wanted tensors added as extra graph outputs, once per batch
(a session of ``sessions``, so a model of any size).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx

from worker.pipeline import sessions
from worker.pipeline.data import Dataset


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, batch_size: int = 64,
            limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: value}`` for the wanted tensors, one dict per batch of ``data``."""
    run = sessions.session(model, outputs=names)
    for feeds in data.batches(batch_size, limit):
        values = run.run(list(names), feeds)
        yield dict(zip(names, values))


def hessian_of_inputs(samples: Iterable[np.ndarray], columns: int) -> tuple[np.ndarray, int]:
    """H = 2/n * sum x x^T over every row of the layer's input, with the last axis as features
    (GPTQ's proxy Hessian). Returns (H float64 [columns, columns], rows seen)."""
    hessian = np.zeros((columns, columns), dtype=np.float64)
    rows = 0
    for x in samples:
        flat = np.asarray(x, dtype=np.float64).reshape(-1, columns)
        hessian += flat.T @ flat
        rows += flat.shape[0]
    if rows:
        hessian *= 2.0 / rows
    return hessian, rows
