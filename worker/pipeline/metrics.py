"""What the report measures (docs/report.md): bytes, params, MACs, latency, fidelity, accuracy,
and the per-layer weight and output error.

Every measure reads the model from disk or walks its protobuf without copying the weights:
sessions (``sessions``) are built from the saved file, shapes are inferred (``shape_inference``) on a
skeleton that holds only the small initializers, and zstd streams the file.

Definitions:
- ``params``: elements over every initializer and Constant tensor (subgraphs included), counted
  unpacked (an int4 tensor of 64 values is 64 params). ``nonzero_params``: those not equal to zero
  (for a tensor a DequantizeLinear reads: values not at its zero point; for MatMulNBits, whose B packs
  8/bits weights per byte, the N x K weights it encodes, nonzero where not at their zero point; for
  a weight stored sparse, bitmask + values, the dense tensor it decodes to; for clustered indices
  packed in words, the weights they index).
- ``macs``: multiply-accumulates for one sample (symbolic dims: the sizes of the evaluation or
  calibration data where given, else 1, and then a lower bound, see ``MacCount``) of Conv, ConvTranspose,
  Gemm, MatMul, their quantized and fused forms (QLinearConv, ConvInteger, QLinearMatMul,
  MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul, FusedMatMul, MatMulNBits) and the
  recurrent cells (LSTM: 4, GRU: 3, RNN: 1 gates of ``H * (I + H)`` per step and direction).
- fidelity over all outputs of all samples concatenated into one vector y (original) and y'
  (compressed): ``rel_l2 = ||y' - y|| / ||y||``, ``cosine = <y, y'> / (||y|| ||y'||)``;
  ``top1_agreement`` over 2-D float outputs ``[N, C]`` with C > 1 (argmax equal, averaged);
  ``Fidelity.outputs`` the same rel_l2 and cosine per output (an integer output's ``agreement`` too).
  An output whose shape differs between the two models on some batch (its shape depends on the
  data: NonMaxSuppression) is left out of all of them, and its row counts those batches.
- accuracy: argmax of the first 2-D float output against ``_labels``.
"""
from __future__ import annotations

import itertools
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from worker.pipeline import graph, sessions, subgraphs
from worker.pipeline import shape_inference
from worker.pipeline.data import Dataset
from worker.pipeline.quantize import sparse_form



# ---------------------------------------------------------------------------- files and bytes


def model_files(path: str | Path) -> list[Path]:
    """The .onnx file and every external-data file it names (each once)."""
    path = Path(path)
    files = [path]
    model = onnx.load(str(path), load_external_data=False)
    seen: set[str] = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                candidate = path.parent / location
                if candidate.exists():
                    files.append(candidate)
    return files


def file_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in model_files(path))


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)


def zstd_bytes(path: str | Path, level: int = 3) -> int:
    """Bytes of the model's files after zstd at ``level`` (streamed; nothing held whole)."""
    import zstandard

    total = 0
    for file in model_files(path):
        counter = _Counter()
        compressor = zstandard.ZstdCompressor(level=level)
        with open(file, "rb") as source:
            compressor.copy_stream(source, counter)
        total += counter.count
    return total


# ---------------------------------------------------------------------------- params


def _graph_tensors(g: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from g.initializer
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
        for sub in subgraphs.bodies(node):
            yield from _graph_tensors(sub)


def _all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def tensor_values(tensor: onnx.TensorProto, base_dir: str | Path | None = None) -> np.ndarray:
    """The tensor's values as a plain numpy array (sub-byte types widened to int8 / uint8)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and base_dir is not None:
        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(loaded, str(base_dir))
        tensor = loaded
    array = numpy_helper.to_array(tensor)
    if array.dtype.kind == "V":        # ml_dtypes: int4 / int2 / uint4 / uint2 / bfloat16 / float8 / float4
        name = array.dtype.name
        array = array.astype(np.int8 if name in ("int4", "int2") else np.uint8 if name in ("uint4", "uint2") else np.float32)
    return array


def _matmulnbits_weights(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Packed B initializers of com.microsoft MatMulNBits, by name: their bytes hold 8/bits weights each."""
    return {node.input[1]: node for node in model.graph.node
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) > 1}


def _matmulnbits_counts(tensor: onnx.TensorProto, node: onnx.NodeProto, tensors: dict[str, onnx.TensorProto],
                        base_dir: str | Path | None) -> tuple[int, int]:
    """(weights, weights not at their zero point) of a MatMulNBits B tensor [N, blocks, blob], counted
    as the N x K weights it encodes, not as packed bytes."""
    from worker.pipeline.graph import attribute
    import kernels

    bits, n, k = attribute(node, "bits", 4), attribute(node, "N"), attribute(node, "K")
    packed = tensor_values(tensor, base_dir).astype(np.uint8, copy=False)
    blocks = packed.shape[1] if packed.ndim == 3 else 1
    per_block = packed.shape[-1] * 8 // bits
    values = kernels.unpack(np.ascontiguousarray(packed).reshape(-1), bits, signed=False,
                            count=n * blocks * per_block).reshape(n, blocks, per_block)
    zero_points = tensors.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if zero_points is None:
        zero = np.full((n, blocks, 1), 1 << (bits - 1), dtype=np.int32)
    elif zero_points.data_type == onnx.TensorProto.UINT8:
        raw = tensor_values(zero_points, base_dir).astype(np.uint8, copy=False).reshape(-1)
        per_row = raw.size // n
        zero = kernels.unpack(raw, bits, signed=False, count=n * per_row * 8 // bits).reshape(n, -1)[:, :blocks, None]
    else:   # float zero points: the stored values carry no exact zero to count
        return n * k, n * k
    nonzero = int(np.count_nonzero(values.reshape(n, -1)[:, :k] != np.broadcast_to(zero, values.shape).reshape(n, -1)[:, :k]))
    return n * k, nonzero


def _node_inputs(g: onnx.GraphProto, skip: set[str]) -> Iterable[str]:
    """Every input name of every node of ``g`` and its subgraphs, but nodes named in ``skip``."""
    for node in g.node:
        if node.name in skip:
            continue
        yield from node.input
        for sub in subgraphs.bodies(node):
            yield from _node_inputs(sub, skip)


def _sparse_stored(model: onnx.ModelProto, base_dir: str | Path | None
                   ) -> tuple[list[onnx.TensorProto], set[str]]:
    """Weights stored sparse (``quantize.sparse_storage``, read by ``quantize.sparse_form``: bitmask + values, decoded at load), as the
    dense tensors they decode to, and the initializers that only their decoding reads. Counting the
    dense tensors instead of those initializers gives the counts of the same model stored dense."""
    found = sparse_form.find_sparse_weights(model.graph)
    if not found:
        return [], set()
    decoding = {node.name for sparse in found for node in sparse.nodes}
    read_elsewhere = set(_node_inputs(model.graph, decoding)) | {o.name for o in model.graph.output}
    hidden = {name for sparse in found for name in sparse.inputs() if name not in read_elsewhere}
    read = lambda tensor: tensor_values(tensor, base_dir)  # noqa: E731
    return [sparse_form.decoded_tensor(model.graph, sparse, read) for sparse in found], hidden


def _dequantized_zeros(model: onnx.ModelProto) -> dict[str, tuple[str, int, int]]:
    """Quantized initializers a DequantizeLinear reads with a zero point: name -> (zero point's
    initializer, axis, block_size). Their zero weights are the values at the zero point (an
    asymmetric uint4 grid's zero is 8, not 0)."""
    found = {}
    for g in [model.graph, *subgraphs.all_bodies(model)]:
        for node in g.node:
            if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
                found[node.input[0]] = (node.input[2], axis, block)
    return found


def _at_zero_point(values: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``values`` == their zero point, per tensor, per ``axis`` or per block along it."""
    zero = np.asarray(zero).astype(np.int64)
    if zero.size == 1:
        return values == zero.reshape(())
    axis = axis % values.ndim
    if block:
        zero = np.repeat(zero, block, axis=axis).take(np.arange(values.shape[axis]), axis=axis)
    else:
        zero = zero.reshape([-1 if i == axis else 1 for i in range(values.ndim)])
    return values.astype(np.int64) == zero


def _cluster_codes(model: onnx.ModelProto) -> dict[str, tuple[str, str, int]]:
    """Packed cluster indices (``steps.cluster``: words -> BitShift left -> BitShift right ->
    Reshape -> Slice -> Cast -> Gather(codebook)): words -> (codebook, element count, bits)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output if out}

    def up(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    found = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        cast = up(node.input[1], "Cast")
        head = up(cast.input[0], "Slice") if cast is not None else None
        flat = up(head.input[0], "Reshape") if head is not None else None
        right = up(flat.input[0], "BitShift") if flat is not None else None
        left = up(right.input[0], "BitShift") if right is not None else None
        if left is None or left.input[0] not in inits or right.input[1] not in inits or head.input[2] not in inits:
            continue
        shift = int(np.asarray(numpy_helper.to_array(inits[right.input[1]])).reshape(-1)[0])
        found[left.input[0]] = (node.input[0], head.input[2], 32 - shift)
    return found


def _cluster_counts(words: onnx.TensorProto, code: tuple[str, str, int], tensors: dict[str, onnx.TensorProto],
                    base_dir: str | Path | None) -> tuple[int, int]:
    """(weights, weights not zero) a clustered weight's packed indices decode to."""
    book, count_name, bits = code
    count = int(np.asarray(tensor_values(tensors[count_name], base_dir)).reshape(-1)[0])
    packed = np.asarray(tensor_values(words, base_dir)).astype(np.uint64).reshape(-1)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * bits
    labels = ((packed[:, None] >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    codebook = np.asarray(tensor_values(tensors[book], base_dir)).reshape(-1)
    return count, int(np.count_nonzero(codebook[labels.astype(np.int64)]))


def param_counts(model: onnx.ModelProto, base_dir: str | Path | None = None) -> tuple[int, int]:
    """(params, nonzero params) over initializers and Constant tensors, subgraphs included; a weight
    stored sparse counts as the dense tensor it decodes to, clustered indices as the weights they
    index, and a quantized tensor's zeros are its values at the zero point."""
    params = nonzero = 0
    packed_weights = _matmulnbits_weights(model)
    decoded, hidden = _sparse_stored(model, base_dir)
    zeros = _dequantized_zeros(model)
    clustered = _cluster_codes(model)
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    tensors.update({tensor.name: tensor for tensor in decoded})
    for tensor in itertools.chain((t for t in _all_tensors(model) if t.name not in hidden), decoded):
        node = packed_weights.get(tensor.name)
        if node is not None and tensor.name in tensors:
            counts = _matmulnbits_counts(tensor, node, tensors, base_dir)
            params, nonzero = params + counts[0], nonzero + counts[1]
            continue
        if tensor.name in clustered and tensor.name in tensors:
            counts = _cluster_counts(tensor, clustered[tensor.name], tensors, base_dir)
            params, nonzero = params + counts[0], nonzero + counts[1]
            continue
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        params += count
        if tensor.data_type == onnx.TensorProto.STRING:
            nonzero += count
            continue
        try:
            values = tensor_values(tensor, base_dir)
        except Exception:   # a tensor whose data cannot be read counts as dense
            nonzero += count
            continue
        if tensor.name in zeros and zeros[tensor.name][0] in tensors:
            zero_name, axis, block = zeros[tensor.name]
            try:
                at_zero = _at_zero_point(values, tensor_values(tensors[zero_name], base_dir), axis, block)
            except ValueError:      # a zero point that does not broadcast: count the stored values
                at_zero = values == 0
            nonzero += int(values.size - np.count_nonzero(at_zero))
            continue
        nonzero += int(np.count_nonzero(values))
    return params, nonzero


# ---------------------------------------------------------------------------- MACs


def _prod(values: Sequence[int]) -> int:
    return int(np.prod(values, dtype=np.int64)) if len(values) else 1


_MATMUL_OPS = frozenset({"MatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                         "FusedMatMul", "MatMulNBits", "MatMulBnb4", "MatMulFpQ4"})
MAC_OPS = _MATMUL_OPS | {"Gemm", "Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "LSTM", "GRU", "RNN"}


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one node from its inferred shapes (0 when unknown or not counted)."""
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    if op in _MATMUL_OPS:
        a = get(0)
        if out is None or a is None or not a:
            return 0
        if op == "MatMulNBits":
            k = graph.attribute(node, "K", a[-1])
        elif op == "FusedMatMul" and graph.attribute(node, "transA", 0) and len(a) >= 2:
            k = a[-2]
        else:
            k = a[-1]
        return _prod(out) * int(k)
    if op == "Gemm":
        a = get(0)
        if out is None or a is None or len(a) != 2:
            return 0
        k = a[0] if graph.attribute(node, "transA", 0) else a[1]
        return _prod(out) * int(k)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = get(3 if op == "QLinearConv" else 1)
        if out is None or w is None or len(w) < 3:
            return 0
        return _prod(out) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if x is None or w is None or len(w) < 3:
            return 0
        group = graph.attribute(node, "group", 1)
        return _prod(x) * (w[1]) * _prod(w[2:]) if group else 0
    if op in ("LSTM", "GRU", "RNN"):
        x = get(0)
        hidden = graph.attribute(node, "hidden_size")
        if x is None or len(x) != 3 or not hidden:
            return 0
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        directions = 2 if graph.attribute(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
        layout = graph.attribute(node, "layout", 0)
        seq, batch = (x[0], x[1]) if layout == 0 else (x[1], x[0])
        return seq * batch * directions * gates * hidden * (x[2] + hidden)
    return 0


@dataclass(frozen=True)
class MacCount:
    """MACs for one sample and whether they are only a lower bound: a symbolic input dim was taken
    as 1 (no data gave its size), a layer's shapes stayed unknown (it counts 0), or layers inside
    If / Loop / Scan bodies (not counted) exist."""
    macs: int
    lower_bound: bool


def _body_has_mac_ops(node: onnx.NodeProto) -> bool:
    return any(inner.op_type in MAC_OPS or _body_has_mac_ops(inner)
               for body in subgraphs.bodies(node) for inner in body.node)


def mac_count(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]] | None = None) -> MacCount:
    """MACs with the graph inputs of the shapes ``inputs`` gives (one sample of the data), see MacCount."""
    guessed: list[str] = []
    shapes = shape_inference.inferred_shapes(model, inputs, guessed)
    total, unknown = 0, False
    for node in model.graph.node:
        count = node_macs(node, shapes)
        total += count
        unknown = unknown or (count == 0 and node.op_type in MAC_OPS) or _body_has_mac_ops(node)
    return MacCount(total, bool(guessed) or unknown)


def macs(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]] | None = None) -> int:
    return mac_count(model, inputs).macs


def latency(sessions: Sequence[ort.InferenceSession], feeds: dict[str, np.ndarray], *, runs: int = 50,
            warmup: int = 3, budget_s: float = 10.0, min_runs: int = 5,
            settled: Callable[[list[list[float]]], bool] | None = None) -> list[dict[str, float]]:
    """p50 / p95 in ms of each session on ``feeds``, runs interleaved so that both see the same
    machine state; stops early when ``budget_s`` is spent (at least ``min_runs`` runs each), or,
    where the caller only needs a decision, as soon as ``settled`` says the times so far (ms, per
    session) decide it (checked from the ``min_runs``-th run on)."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for index in range(runs):
        for which, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[which].append((time.perf_counter() - t0) * 1000.0)
        if index + 1 >= min_runs and (time.perf_counter() - start > budget_s or (settled is not None and settled(times))):
            break
    return [{"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95))} for t in times]


# ---------------------------------------------------------------------------- fidelity


@dataclass
class Fidelity:
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    accuracy_original: float | None
    accuracy_compressed: float | None
    samples: int
    outputs: list[dict] = field(default_factory=list)    # per model output: ``_OutputFidelity.row``


@dataclass
class _OutputFidelity:
    """One output's share of ``fidelity``: the contract's rel_l2 and cosine concatenate every
    output, so an index output (an argmax, int64) with one flip outweighs a float output's whole
    error, and a float output's scale hides another's; per output the user sees which moved. An
    integer output's ``agreement`` is the fraction of its elements equal in both models."""

    name: str
    integer: bool = False
    diff2: float = 0.0
    ref2: float = 0.0
    out2: float = 0.0
    dot: float = 0.0
    equal: int = 0
    elements: int = 0
    shape_mismatches: int = 0     # batches where the two models gave this output different shapes

    def row(self) -> dict:
        if self.shape_mismatches:
            return {"name": self.name, "rel_l2": None, "cosine": None, "shape_mismatches": self.shape_mismatches}
        rel_l2 = math.sqrt(self.diff2) / math.sqrt(self.ref2) if self.ref2 > 0 else (0.0 if self.diff2 == 0 else math.inf)
        if self.ref2 > 0 and 0 < self.out2 < math.inf:
            cosine = self.dot / (math.sqrt(self.ref2) * math.sqrt(self.out2))
        else:
            cosine = 1.0 if self.diff2 == 0 else 0.0
        row = {"name": self.name, "rel_l2": float(rel_l2), "cosine": float(cosine)}
        if self.integer:
            row["agreement"] = self.equal / self.elements if self.elements else None
        return row


def _is_classifier(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


FIDELITY_BATCH_BYTES = 4 << 20     # inputs per fidelity batch: two models run it, every intermediate alive


def fidelity(original: ort.InferenceSession, compressed: ort.InferenceSession, data: Dataset, *,
             batch_size: int = 64, limit: int | None = 512) -> Fidelity:
    """Compare the two sessions' outputs over ``data`` (see the module docstring for the formulas)."""
    names = [o.name for o in original.get_outputs()]
    diff2 = ref2 = out2 = dot = 0.0
    agree = total = 0
    correct_o = correct_c = labelled = 0
    batch_size = data.batch_for(FIDELITY_BATCH_BYTES, batch_size)
    labels_iter = data.label_batches(batch_size, limit) if data.labels is not None else None
    samples = 0
    per_output = [_OutputFidelity(name) for name in names]
    for feeds in data.batches(batch_size, limit):
        ys = original.run(names, feeds)
        zs = compressed.run(names, feeds)
        labels = next(labels_iter) if labels_iter is not None else None
        first_classifier = True
        for y, z, share in zip(ys, zs, per_output):
            y64 = np.asarray(y, dtype=np.float64).ravel()
            z64 = np.asarray(z, dtype=np.float64).ravel()
            y64 = np.nan_to_num(y64, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
            if np.shape(y) != np.shape(z):
                # a shape that depends on the data (NonMaxSuppression's boxes, TopK over a threshold):
                # no element matches another; that output leaves the sums, and its row says so
                share.shape_mismatches += 1
                continue
            diff = z64 - y64
            terms = (float(np.dot(diff, diff)) if np.isfinite(diff).all() else math.inf, float(np.dot(y64, y64)),
                     float(np.dot(z64, z64)) if np.isfinite(z64).all() else math.inf,
                     float(np.dot(y64, z64)) if np.isfinite(z64).all() else 0.0)
            diff2, ref2, out2, dot = diff2 + terms[0], ref2 + terms[1], out2 + terms[2], dot + terms[3]
            share.diff2, share.ref2, share.out2, share.dot = (share.diff2 + terms[0], share.ref2 + terms[1],
                                                              share.out2 + terms[2], share.dot + terms[3])
            if np.asarray(y).dtype.kind in "iub":
                share.integer = True
                share.equal += int(np.count_nonzero(np.asarray(y).ravel() == np.asarray(z).ravel()))
                share.elements += int(y64.size)
            if _is_classifier(np.asarray(y)):
                ya, za = np.argmax(y, axis=1), np.argmax(z, axis=1)
                agree += int(np.sum(ya == za))
                total += ya.shape[0]
                if first_classifier and labels is not None and labels.shape[0] == ya.shape[0]:
                    correct_o += int(np.sum(ya == labels))
                    correct_c += int(np.sum(za == labels))
                    labelled += ya.shape[0]
                first_classifier = False
        samples += next(iter(feeds.values())).shape[0] if data.batchable else 1
    rel_l2 = math.sqrt(diff2) / math.sqrt(ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf)
    if ref2 > 0 and out2 > 0 and math.isfinite(out2):
        cosine = dot / (math.sqrt(ref2) * math.sqrt(out2))
    else:
        cosine = 1.0 if diff2 == 0 else 0.0
    return Fidelity(
        rel_l2=float(rel_l2), cosine=float(cosine),
        top1_agreement=agree / total if total else None,
        accuracy_original=correct_o / labelled if labelled else None,
        accuracy_compressed=correct_c / labelled if labelled else None,
        samples=samples,
        outputs=[share.row() for share in per_output],
    )


# ---------------------------------------------------------------------------- per layer


def sqnr_db(original: np.ndarray, reconstructed: np.ndarray) -> float:
    """10 log10(sum w^2 / sum (w - w')^2); inf where the weight is reproduced exactly."""
    w = np.asarray(original, dtype=np.float64)
    err = float(np.sum((w - np.asarray(reconstructed, dtype=np.float64)) ** 2))
    signal = float(np.sum(w * w))
    if err == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / err)


TENSOR_ERROR_BYTES = 256 * 1024 * 1024   # intermediate outputs of the original kept for comparison


def tensor_errors(original_path: str | Path, compressed_path: str | Path, pairs: dict[str, tuple[str, str]],
                  data: Dataset, *, scratch: str | Path, provider: str = "CPUExecutionProvider", batch_size: int = 64,
                  limit: int = 64, budget_bytes: int = TENSOR_ERROR_BYTES) -> dict[str, float]:
    """rel_l2 of intermediate tensors: ``pairs[key] = (tensor in original, tensor in compressed)``.
    One model at a time (never both sessions in memory): the original runs on ``data`` with those
    tensors as extra outputs, which are kept (up to ``budget_bytes``); then the compressed model
    runs on the same batches and is compared. ``scratch``: a directory for re-written copies
    (removed at the end)."""
    if not pairs:
        return {}
    scratch = Path(scratch)
    try:
        return _tensor_errors(original_path, compressed_path, pairs, data, scratch, provider, batch_size, limit,
                              budget_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tensor_errors(original_path, compressed_path, pairs, data, scratch, provider, batch_size, limit,
                   budget_bytes) -> dict[str, float]:
    keys = list(pairs)
    kept: list[list[np.ndarray]] = []
    stored = 0
    # a batch's intermediates all stay alive in a session that exposes them: the batch is bounded by
    # its inputs as fidelity's is, not only by the kept tensors (with 13 layers to compare instead of
    # 36, the PP-OCR recognizer's batches grew to 64 images and the measuring to 1.4 GB)
    batch_size = data.batch_for(FIDELITY_BATCH_BYTES, batch_size)
    run = sessions.exposed_file_session(original_path, [pairs[k][0] for k in keys], provider, scratch)
    total = data.size if limit is None else min(limit, data.size)
    # the first sample alone tells what one sample's tensors take: the batch is sized so that the
    # kept tensors stay within the budget (64 samples of every layer output of a BERT is ~0.5 GB,
    # and a whole batch used to be kept before the budget was looked at)
    parts = [data.slice(0, 1)]
    first = [np.asarray(v, dtype=np.float32) for v in run.run([pairs[k][0] for k in keys], next(parts[0].batches(1)))]
    per_sample = max(sum(v.nbytes for v in first), 1)
    kept.append(first)
    stored = per_sample
    step = max(1, min(batch_size, budget_bytes // (2 * per_sample))) if data.batchable else 1
    for start in range(1, total, step):
        if stored + per_sample * min(step, total - start) > budget_bytes:
            break
        part = data.slice(start, start + step)
        values = [np.asarray(v, dtype=np.float32) for v in run.run([pairs[k][0] for k in keys], next(part.batches(step)))]
        parts.append(part)
        kept.append(values)
        stored += sum(v.nbytes for v in values)
    del run
    sessions.release_memory()
    sums = {key: [0.0, 0.0] for key in keys}
    run = sessions.exposed_file_session(compressed_path, [pairs[k][1] for k in keys], provider, scratch)
    for feeds, originals in zip((next(part.batches(part.size)) for part in parts), kept):
        for key, y, z in zip(keys, originals, run.run([pairs[k][1] for k in keys], feeds)):
            y64 = y.astype(np.float64).ravel()
            z64 = np.asarray(z, dtype=np.float64).ravel()
            if y64.shape != z64.shape:
                sums[key] = [math.nan, 1.0]
                continue
            d = z64 - y64
            sums[key][0] += float(np.dot(d, d))
            sums[key][1] += float(np.dot(y64, y64))
    return {key: (math.sqrt(e) / math.sqrt(s) if s > 0 else (0.0 if e == 0 else math.inf))
            for key, (e, s) in sums.items()}


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf / NaN: such values are reported as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)

