"""Intermediate tensors of a model on data: what a layer sees, for Hessians (GPTQ, SparseGPT),
calibration ranges and layer-wise reconstruction.

ONNX Runtime runs the model with the wanted tensors added as extra graph outputs, once per batch.
Sessions on in-memory models go through ``payload``: a model too big for one protobuf (2 GiB) is
handed over as its structure, its weights written once to a scratch file that ONNX Runtime reads as
external data, so nothing is held twice in memory and nothing hits protobuf's limit.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from worker.pipeline import graph
from worker.pipeline.data import Dataset

EXTERNAL_ALIGNMENT = 4096      # page-aligned offsets let ONNX Runtime map the file


def payload(model: onnx.ModelProto, options: ort.SessionOptions) -> tuple[bytes, tempfile.TemporaryDirectory | None]:
    """The bytes to build a session from, and the scratch directory that must outlive the session
    (None for a model that serializes whole). For a big model every raw-data initializer of 1 KiB or
    more is written to ``weights.bin`` and cleared, the structure serialized, then each is read back:
    memory never holds more than the model plus one tensor."""
    if model.ByteSize() < graph.EXTERNAL_DATA_THRESHOLD:
        return model.SerializeToString(), None
    scratch = tempfile.TemporaryDirectory(prefix="fw-session-")
    data_path = Path(scratch.name) / "weights.bin"
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    with open(data_path, "wb") as sink:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < 1024:
                continue
            sink.seek(-sink.tell() % EXTERNAL_ALIGNMENT, 1)
            offset, length = sink.tell(), sink.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            _point_to(tensor, data_path.name, offset, length)
            moved.append((tensor, offset, length))
    try:
        structure = model.SerializeToString()
    finally:
        with open(data_path, "rb") as source:
            for tensor, offset, length in moved:
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                source.seek(offset)
                tensor.raw_data = source.read(length)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", scratch.name)
    return structure, scratch


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def build_session(model: onnx.ModelProto, options: ort.SessionOptions, providers: Sequence[str]) -> ort.InferenceSession:
    """An ONNX Runtime session on the in-memory ``model``, whatever its size (see ``payload``)."""
    data, scratch = payload(model, options)
    run = ort.InferenceSession(data, options, providers=list(providers))
    run._featherweight_scratch = scratch     # the external weights live as long as the session
    return run


def session(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",),
            threads: int = 0, *, outputs: Iterable[str] = (), prepack: bool = True) -> ort.InferenceSession:
    """A session on ``model``; ``outputs`` are added as extra graph outputs for the serialization
    and taken off again (the model is not copied). ``prepack=False`` spares the pre-packed second
    copy of the weights that only speed needs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    count = len(model.graph.output)
    present = {output.name for output in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(name)
                              for name in dict.fromkeys(outputs) if name not in present)
    try:
        return build_session(model, options, providers)
    finally:
        del model.graph.output[count:]


CAPTURE_BUDGET = 256 << 20     # bytes of captured tensors one batch may hold


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
    run = session(model, outputs=names)
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
