"""Intermediate tensors of a model on data: what a layer sees, for Hessians (GPTQ, SparseGPT),
calibration ranges and layer-wise reconstruction.

ONNX Runtime runs the model with the wanted tensors added as extra graph outputs, once per batch.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from worker.pipeline.data import Dataset


def session(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",),
            threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (intermediate tensors)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {output.name for output in exposed.graph.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # shape inference is a nicety here: ORT infers the types itself
        types = {}
    for name in names:
        if name in present:
            continue
        value = types.get(name)
        exposed.graph.output.append(value if value is not None else helper.make_empty_tensor_value_info(name))
        present.add(name)
    return exposed


def capture(model: onnx.ModelProto, data: Dataset, names: Sequence[str], *, batch_size: int = 64,
            limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: value}`` for the wanted tensors, one dict per batch of ``data``."""
    run = session(with_outputs(model, names))
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
