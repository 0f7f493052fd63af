"""Sequential propagation: a model's calibration activations carried forward segment by segment.

The layer-by-layer methods (SparseGPT, GPTQ, layer-wise distillation) need, for each layer in graph
order, its input on every calibration sample *on the model as changed so far*. Running the whole
model once per layer rebuilds a session of the whole model and recomputes every earlier layer each
time: quadratic in depth (a 6-layer BERT: 24 groups x 2 full-model sessions and passes). Here the
model's nodes (in their topological order) are cut where a wanted tensor is produced; each segment
between two cuts becomes a small ONNX model whose inputs are the tensors alive at the cut, and its
session is built once, when the propagation reaches it - by then every layer inside it has been
processed, so it carries the final weights. The calibration samples flow through each segment once:
the whole job costs about one forward pass, and every weight goes into exactly one session.

What is held between segments is the *live set* (tensors produced so far that a later node still
reads), per batch. Memory is bounded whatever the calibration size: past ``budget_bytes`` the live
set of each batch is spilled to a scratch file and read back one batch at a time.

``stream(names)`` yields ``{name: value}`` per batch and advances the propagation while the caller
consumes it (the caller accumulates its statistics batch by batch: nothing of the size of the whole
calibration set is built). Two propagations over the same samples (the original model and the one
being changed, a teacher and a student) go in lockstep with ``zip``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from worker.pipeline import sessions
from worker.pipeline.data import Dataset
from worker.pipeline.subgraphs import outer_reads

DEFAULT_BUDGET = 128 << 20        # bytes of live activations held in memory per propagation
BATCH_INPUT_BYTES = 4 << 20       # a batch's model inputs at most this big (intermediates are a few x that)

_NUMPY_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE,
                  np.dtype(np.float16): onnx.TensorProto.FLOAT16, np.dtype(np.int64): onnx.TensorProto.INT64,
                  np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.int8): onnx.TensorProto.INT8,
                  np.dtype(np.uint8): onnx.TensorProto.UINT8, np.dtype(np.bool_): onnx.TensorProto.BOOL}


def budget_of(options) -> int:
    """The in-memory budget a job's options ask for (``propagation_budget_bytes``), else the default."""
    return int((options or {}).get("propagation_budget_bytes", DEFAULT_BUDGET))


class SequenceError(RuntimeError):
    """A propagation used out of order (a stream abandoned half way)."""


@dataclass
class _Batch:
    """The live tensors of one batch: in memory, or in a scratch file once over budget."""

    values: dict[str, np.ndarray] | None = None
    path: Path | None = None

    def load(self) -> dict[str, np.ndarray]:
        if self.values is not None:
            return self.values
        with np.load(self.path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}


@dataclass
class _Stats:
    segments: int = 0
    restarts: int = 0
    spilled: int = 0
    nodes: int = 0
    held_bytes: list[int] = field(default_factory=list)


def _reads(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | outer_reads(node)


class Propagation:
    """The calibration samples of ``data`` carried through ``model`` (see the module docstring).

    ``model`` is read lazily: a segment's weights are taken from it when the propagation reaches the
    segment, so the caller changes a layer's initializers before streaming past the layer. Its
    nodes must not change (weights only)."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, *, batch_size: int = 32, limit: int | None = None,
                 budget_bytes: int = DEFAULT_BUDGET, providers: Sequence[str] = ("CPUExecutionProvider",),
                 scratch: str | Path | None = None):
        self.model = model
        self.data = data
        # images are big samples: 32 detector inputs of 3 x 480 x 480 are 88 MB, and each segment's
        # intermediates for the batch several times that; token ids are tiny
        self.batch_size = data.batch_for(BATCH_INPUT_BYTES, batch_size)
        self.limit = limit
        self.budget = budget_bytes
        self.providers = list(providers)
        self.nodes = list(model.graph.node)
        self.node_reads = [_reads(node) for node in self.nodes]
        self.produced_at = {name: index for index, node in enumerate(self.nodes) for name in node.output if name}
        self.last_read: dict[str, int] = {}
        for index, names in enumerate(self.node_reads):
            for name in names:
                self.last_read[name] = index
        self.inputs = {spec.name for spec in data.specs}
        self._scratch_root = scratch
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.stats = _Stats()
        self._busy = False
        self._broken = False
        self._start()

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        self.position = 0
        self.batches = [_Batch(values=dict(feeds)) for feeds in self.data.batches(self.batch_size, self.limit)]
        self._held = sum(_nbytes(b.values) for b in self.batches)

    def close(self) -> None:
        self.batches = []
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> "Propagation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _store(self, index: int, values: dict[str, np.ndarray], over_budget: bool) -> _Batch:
        if not over_budget:
            return _Batch(values=values)
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="fw-propagation-", dir=self._scratch_root)
        path = Path(self._scratch.name) / f"batch{index}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **values)
        os.replace(tmp, path)
        self.stats.spilled += 1
        return _Batch(path=path)

    # ------------------------------------------------------------------ segments
    def _segment(self, start: int, end: int, wanted: set[str], sample: dict[str, np.ndarray]) -> tuple[ort.InferenceSession | None, list[str]]:
        """A session for nodes [start, end) whose outputs are ``wanted`` plus what later nodes read."""
        nodes = self.nodes[start:end]
        produced = {name for node in nodes for name in node.output if name}
        inits = {t.name: t for t in self.model.graph.initializer}
        reads = set().union(*self.node_reads[start:end]) if nodes else set()
        needed_inits = sorted(name for name in reads if name in inits and name not in produced)
        feeds = sorted(name for name in reads if name not in produced and name not in inits)
        missing = [name for name in feeds if name not in sample]
        if missing:
            raise SequenceError(f"tensor {missing[0]!r} is not alive at node {start}")
        outputs = sorted(name for name in produced
                         if name in wanted or self.last_read.get(name, -1) >= end)
        if not outputs:
            return None, []
        graph = helper.make_graph(
            [n for n in nodes], f"segment_{start}_{end}",
            [helper.make_tensor_value_info(name, _NUMPY_TO_ONNX[np.asarray(sample[name]).dtype], None) for name in feeds],
            [helper.make_empty_tensor_value_info(name) for name in outputs],
            initializer=[inits[name] for name in needed_inits])
        segment = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        segment.ir_version = self.model.ir_version
        segment.functions.extend(self.model.functions)
        # a session that runs a handful of batches: pre-packing would copy every weight for nothing;
        # no arena: a segment's intermediates go back to the OS after each batch instead of every
        # segment session keeping its own high-water mark of image-sized buffers
        session = sessions.session(segment, self.providers, prepack=False, arena=False, spin=False)
        self.stats.segments += 1
        self.stats.nodes += len(nodes)
        return session, outputs

    def stream(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """``{name: value}`` for each batch, propagating up to where the last of ``names`` is made.
        Consume it to the end: the propagation advances with it."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self.produced_at and n not in self.inputs]
        if unknown:
            raise KeyError(f"no node produces {unknown[0]!r}")
        if self._busy:
            raise SequenceError("a stream of this propagation is still being consumed")
        if self._broken:
            raise SequenceError("a stream of this propagation was abandoned half way")
        end = max([self.produced_at[n] + 1 for n in names if n in self.produced_at] + [self.position])
        # a wanted tensor made before the current position and no longer alive: start over
        if any(n in self.produced_at and self.produced_at[n] < self.position and self.last_read.get(n, -1) < self.position
               for n in names):
            self.stats.restarts += 1
            self._start()
            end = max([self.produced_at[n] + 1 for n in names if n in self.produced_at] + [0])
        return self._advance(names, end)

    def _advance(self, names: list[str], end: int) -> Iterator[dict[str, np.ndarray]]:
        self._busy = True
        finished = False
        try:
            start = self.position
            session, outputs = None, []
            held = 0
            for index, batch in enumerate(self.batches):
                values = batch.load()
                if index == 0 and end > start:
                    session, outputs = self._segment(start, end, set(names), values)
                if session is not None:
                    feeds = {i.name: values[i.name] for i in session.get_inputs()}
                    values = {**values, **dict(zip(outputs, session.run(outputs, feeds)))}
                yield {name: values[name] for name in names}
                alive = {name: value for name, value in values.items() if self.last_read.get(name, -1) >= end}
                size = _nbytes(alive)
                held += size
                self.batches[index] = self._store(index, alive, held > self.budget)
                if batch.path is not None and self.batches[index].path != batch.path:
                    batch.path.unlink(missing_ok=True)
            self.position = max(end, start)
            self._held = held
            self.stats.held_bytes.append(held)
            finished = True
        finally:
            self._busy = False
            self._broken = self._broken or not finished


def lockstep(*streams: Iterator[dict[str, np.ndarray]]) -> Iterator[tuple[dict[str, np.ndarray], ...]]:
    """``zip`` for streams of propagations over the same samples, run to their ends: ``zip`` stops
    at the first exhausted stream and leaves the others unfinished (their propagation would not
    advance)."""
    iterators = [iter(s) for s in streams]
    while True:
        items = [next(it, None) for it in iterators]
        if any(item is None for item in items):
            if not all(item is None for item in items):
                raise SequenceError("propagations in lockstep hold different numbers of batches")
            return
        yield tuple(items)


def _nbytes(values: dict[str, np.ndarray] | None) -> int:
    return sum(int(np.asarray(v).nbytes) for v in (values or {}).values())
