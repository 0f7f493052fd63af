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


# Bytes of captured tensors one batch may hold. A batch costs about 2.5x this in RSS (ONNX Runtime's
# buffers for the run, then the numpy copies it hands back): at 256 MB static int8 on MiniLM peaked at
# 1.26 GB with 1024 samples, over the 2x float + 1 GiB bound; at 128 MB, 0.92 GB for ~6% more CPU.
CAPTURE_BUDGET = 128 << 20


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, batch_size: int = 64,
            limit: int | None = None, budget_bytes: int = CAPTURE_BUDGET) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: value}`` for the wanted tensors, one dict per batch of ``data`` (see
    ``capture_counted``)."""
    for _, values in capture_counted(model, data, names, batch_size=batch_size, limit=limit, budget_bytes=budget_bytes):
        yield values


def capture_counted(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, batch_size: int = 64,
                    limit: int | None = None, budget_bytes: int = CAPTURE_BUDGET
                    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(samples in the batch, {name: value})`` for the wanted tensors, batch by batch.

    The batch is at most ``batch_size`` samples and small enough that the captured tensors of one
    batch stay within ``budget_bytes``: the first sample runs alone and measures what a sample's
    tensors take (every intermediate tensor of a BERT layer at 64 x 104 tokens is ~3 GB)."""
    run = sessions.session(model, outputs=names, spin=False)
    total = data.size if limit is None else min(limit, data.size)
    if not data.batchable or total <= 1 or batch_size <= 1:
        step = batch_size if data.batchable else 1
        for start, feeds in zip(range(0, total, step), data.batches(batch_size, limit)):
            yield min(step, total - start), dict(zip(names, run.run(list(names), feeds)))
        return
    first = dict(zip(names, run.run(list(names), next(data.head(1).batches(1)))))
    per_sample = max(sum(int(v.nbytes) for v in first.values()), 1)
    yield 1, first
    del first
    step = max(1, min(batch_size, budget_bytes // per_sample))
    rest = data.slice(1, total)
    for start, feeds in zip(range(0, total - 1, step), rest.batches(step)):
        yield min(step, total - 1 - start), dict(zip(names, run.run(list(names), feeds)))


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
