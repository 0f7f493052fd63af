"""Sparse storage of integer weights: a bitmask of the positions that hold something other than
the tensor's most common value (the zero a prune step left, or the zero point), and those values
in order. ONNX Runtime's constant folding decodes it once, at session load, with standard ops, into
the dense tensor under its original name: its readers (DequantizeLinear, DynamicQuantizeMatMul,
MatMulNBits, an embedding's Gather) are untouched and inference runs on the same dense weight.

The runner applies it to the final model of a recipe that quantizes, after the last step: a later
step (``distill`` after ``quantize``) reads the quantized weights as initializers, so the storage
form is the file's business, not a step's.

Why: pruning zeroes half the weights, but a dense int8 tensor spends a byte on each zero, and zstd
(level 3) codes the zeros' positions worse than their entropy (short zero runs become matches).
Stored apart, the positions cost about ``H(p)`` bits per weight (p the share of non-fill values)
and the values about their order-0 entropy, which zstd's literal coding reaches. The file itself
shrinks to about ``1/8 + p`` of the dense tensor's bytes.

Format, for a tensor of n elements, fill value f and k other values v_1..v_k (row-major order):

    mask    uint8 [ceil(n / 8), 1]  bit j of byte i (least significant first) = 1 where element
                                    8 i + j differs from f
    values  int8 / uint8 [k + 1]    (f, v_1, ..., v_k)

Decoding (opset 11: BitShift, CumSum), evaluated once by constant folding:

    mask --BitShift LEFT by (7 - j)_j--> [m, 8] --BitShift RIGHT by 7--> bits --Reshape [-1],
    Slice [:n]--> flags --Cast int32 (int64 past 2**31 elements)--> CumSum --Mul flags--> index
    (the rank among the non-fill values, 0 at a fill position) --Gather(values)--> Reshape(shape)

A weight is stored this way only where that makes the file's zstd bytes (level 3, as
``metrics.zstd_bytes`` measures them) smaller by at least ``MIN_GAIN``, measured here
(``store_sparse``), and the file's own bytes no larger (the size ratio M counts them); otherwise it
stays dense. (Without the second rule a dense weight whose sparse form saved one zstd byte grew the
file by 12 %.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.pipeline import graph

MIN_OPSET = 11                      # BitShift, CumSum
MIN_ELEMENTS = 256                  # below this the nine decoding nodes cost more than any saving
ZSTD_LEVEL = 3                      # CONTRACT.md §4's transport_size_ratio: metrics.zstd_bytes
PACKABLE = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
INT32_INDEX_LIMIT = 2 ** 31 - 1     # CumSum in int32 below this (half the memory of int64 at load)
MIN_GAIN = 64                       # zstd bytes a sparse form must save: less is noise, and costs nine nodes
WHOLE_FILE_WORK = 64 << 20          # bytes zstd may go through judging every candidate on the whole file


@dataclass
class Packed:
    """One tensor in sparse form: ``mask`` (uint8 [ceil(n/8), 1]), ``values`` (fill first)."""

    mask: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class SparseWeight:
    """A sparse-stored weight found in a graph: the tensor ``weight`` the decoding nodes produce,
    the initializers they read, and the nodes themselves."""

    weight: str
    mask: str
    values: str
    count: str
    shape: str
    nodes: list[onnx.NodeProto]

    def inputs(self) -> set[str]:
        return {name for node in self.nodes for name in node.input if name}


# ---------------------------------------------------------------------------- numbers


def fill_value(q: np.ndarray) -> int:
    """The tensor's most common value (ties: the one nearest zero, then the smaller)."""
    values, counts = np.unique(q.reshape(-1), return_counts=True)
    best = np.flatnonzero(counts == counts.max())
    return int(values[min(best, key=lambda i: (abs(int(values[i])), int(values[i])))])


def pack(q: np.ndarray, fill: int | None = None) -> Packed:
    """The sparse form of the integer tensor ``q`` (fill: its most common value unless given)."""
    fill = fill_value(q) if fill is None else fill
    flat = q.reshape(-1)
    kept = flat != fill
    mask = np.packbits(kept, bitorder="little").reshape(-1, 1)
    values = np.concatenate([np.array([fill], dtype=q.dtype), flat[kept]])
    return Packed(mask, values, tuple(int(d) for d in q.shape))


def unpack(mask: np.ndarray, values: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """numpy twin of the decoding nodes: the dense tensor of ``shape``."""
    flags = np.unpackbits(np.asarray(mask, dtype=np.uint8).reshape(-1), bitorder="little")[:count].astype(np.int64)
    index = np.cumsum(flags) * flags
    return np.asarray(values)[index].reshape(shape)


def zstd_size(data: bytes) -> int:
    """Bytes after zstd at ``ZSTD_LEVEL``, streamed without a size hint as ``metrics.zstd_bytes``
    compresses a file (a size hint picks other parameters and other sizes)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    return len(compressor.compress(data)) + len(compressor.flush())


# ---------------------------------------------------------------------------- graph


def _decode_nodes(model: onnx.ModelProto, weight: str, mask: str, values: str, count: str, shape: str,
                  shared: dict[str, str], index_type: int) -> list[onnx.NodeProto]:
    base = weight
    names = [graph.unique_name(model, f"{base}_sparse_{step}")
             for step in ("high", "bits", "flat", "flags", "widened", "ranks", "index", "dense")]
    return [
        helper.make_node("BitShift", [mask, shared["left"]], [names[0]], name=names[0], direction="LEFT"),
        helper.make_node("BitShift", [names[0], shared["right"]], [names[1]], name=names[1], direction="RIGHT"),
        helper.make_node("Reshape", [names[1], shared["flat"]], [names[2]], name=names[2]),
        helper.make_node("Slice", [names[2], shared["start"], count], [names[3]], name=names[3]),
        helper.make_node("Cast", [names[3]], [names[4]], name=names[4], to=index_type),
        helper.make_node("CumSum", [names[4], shared["axis"]], [names[5]], name=names[5]),
        helper.make_node("Mul", [names[5], names[4]], [names[6]], name=names[6]),
        helper.make_node("Gather", [values, names[6]], [names[7]], name=names[7], axis=0),
        helper.make_node("Reshape", [names[7], shape], [weight], name=graph.unique_name(model, f"{base}_sparse")),
    ]


def _shared_constants(model: onnx.ModelProto) -> tuple[dict[str, str], list[str]]:
    """The decoding's small constants, one copy for every sparse weight of the graph (found again
    where a graph already has them: a model compressed twice); returns them and those added."""
    wanted = {
        "left": ("sparse_shift_left", (7 - np.arange(8)).astype(np.uint8)),
        "right": ("sparse_shift_right", np.array([7], dtype=np.uint8)),
        "flat": ("sparse_flat_shape", np.array([-1], dtype=np.int64)),
        "start": ("sparse_slice_start", np.array([0], dtype=np.int64)),
        "axis": ("sparse_cumsum_axis", np.array(0, dtype=np.int64)),
    }
    inits = graph.initializers(model)
    out, added = {}, []
    for key, (name, array) in wanted.items():
        tensor = inits.get(name)
        if tensor is not None and tensor.data_type == numpy_helper.from_array(array).data_type and \
                np.array_equal(numpy_helper.to_array(tensor), array):
            out[key] = name
            continue
        out[key] = graph.unique_name(model, name)
        added.append(out[key])
        model.graph.initializer.append(numpy_helper.from_array(array, out[key]))
    return out, added


def candidates(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Integer (int8 / uint8) initializers of the main graph worth trying: at least
    ``MIN_ELEMENTS`` elements, not also a graph input (a caller may feed its own), in the file."""
    graph_inputs = {value.name for value in model.graph.input}
    return [t for t in model.graph.initializer
            if t.data_type in PACKABLE and int(np.prod(t.dims, dtype=np.int64)) >= MIN_ELEMENTS
            and t.name not in graph_inputs and t.data_location != TensorProto.EXTERNAL]


@dataclass
class _Rewrite:
    """One tensor's sparse form as added to the graph, so that it can be taken back."""

    dense: onnx.TensorProto
    added: list[str]
    nodes: list[onnx.NodeProto]


def _apply(model: onnx.ModelProto, tensor: onnx.TensorProto, packed: Packed, shared: dict[str, str]) -> _Rewrite:
    name = tensor.name
    mask_name = graph.unique_name(model, f"{name}_sparse_mask")
    values_name = graph.unique_name(model, f"{name}_sparse_values")
    count_name = graph.unique_name(model, f"{name}_sparse_count")
    shape_name = graph.unique_name(model, f"{name}_sparse_shape")
    index_type = TensorProto.INT32 if packed.count <= INT32_INDEX_LIMIT else TensorProto.INT64
    added = [numpy_helper.from_array(packed.mask, mask_name),
             numpy_helper.from_array(packed.values, values_name),
             numpy_helper.from_array(np.array([packed.count], dtype=np.int64), count_name),
             numpy_helper.from_array(np.array(packed.shape, dtype=np.int64), shape_name)]
    nodes = _decode_nodes(model, name, mask_name, values_name, count_name, shape_name, shared, index_type)
    # the sparse form takes the dense tensor's place in the file (neighbours matter to zstd)
    index = _index_of(model, name)
    dense = onnx.TensorProto()
    dense.CopyFrom(tensor)
    del model.graph.initializer[index]
    for offset, new in enumerate(added):
        model.graph.initializer.insert(index + offset, new)
    # the decoding nodes go first: every reader of the weight comes after them
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return _Rewrite(dense, [t.name for t in added], nodes)


def _index_of(model: onnx.ModelProto, name: str) -> int:
    return next(i for i, t in enumerate(model.graph.initializer) if t.name == name)


def _undo(model: onnx.ModelProto, rewrite: _Rewrite) -> None:
    """Put the dense tensor back where it was; drop the sparse form and its decoding nodes."""
    index = _index_of(model, rewrite.added[0])
    for _ in rewrite.added:
        del model.graph.initializer[index]
    model.graph.initializer.insert(index, rewrite.dense)
    for node in rewrite.nodes:
        position = next(i for i, n in enumerate(model.graph.node) if n.name == node.name)
        del model.graph.node[position]


def _file_zstd(model: onnx.ModelProto) -> int:
    return zstd_size(model.SerializeToString())


def store_sparse(model: onnx.ModelProto, whole_file_work: int = WHOLE_FILE_WORK) -> dict[str, dict]:
    """Rewrite, in place, every candidate integer weight whose sparse form makes the file compress
    smaller (see the module docstring). Returns, for each tensor looked at, its dense and sparse
    bytes (raw and zstd) and whether it was stored sparse.

    zstd codes all literals of a 128 KiB block with one Huffman table, so a tensor's bytes cost
    what they cost next to its neighbours, not alone (in a file under a block, one table codes the
    mask, the values and every other tensor). Where compressing the whole serialized model once per
    candidate stays within ``whole_file_work`` bytes, each tensor, largest first, is stored sparse
    where that shrinks the zstd bytes of the whole model (the measure of ``metrics.zstd_bytes``);
    otherwise tensor by tensor (the mask's and values' zstd bytes plus the decoding nodes' against
    the dense tensor's), which is what counts where tensors span blocks of their own."""
    if graph.opset(model) < MIN_OPSET:
        return {}
    found = [t.name for t in sorted(candidates(model), key=lambda t: -int(np.prod(t.dims, dtype=np.int64)))]
    if not found:
        return {}
    whole = model.ByteSize() * len(found) <= whole_file_work
    current = _file_zstd(model) if whole else 0
    shared, added = _shared_constants(model)
    decisions: dict[str, dict] = {}
    used = False
    for name in found:
        tensor = model.graph.initializer[_index_of(model, name)]
        q = numpy_helper.to_array(tensor)
        packed = pack(q)
        if packed.values.size - 1 == q.size:        # nothing equals the fill value: no gain possible
            continue
        row = {"elements": int(q.size), "fill": int(packed.values[0]), "kept": int(packed.values.size - 1),
               "bytes": int(q.nbytes), "bytes_sparse": int(packed.mask.nbytes + packed.values.nbytes),
               "zstd": zstd_size(q.tobytes()),
               "zstd_sparse": zstd_size(packed.mask.tobytes()) + zstd_size(packed.values.tobytes()),
               "sparse": False}
        decisions[tensor.name] = row
        if row["bytes_sparse"] > row["bytes"]:      # the file would grow: M counts its bytes
            continue
        size_before = model.ByteSize()
        rewrite = _apply(model, tensor, packed, shared)
        if model.ByteSize() > size_before:          # the decoding nodes outweigh what the mask saved
            better = False
        elif whole:
            trial = _file_zstd(model)
            row["file_zstd"], row["file_zstd_sparse"] = current, trial
            better = trial <= current - MIN_GAIN
        else:
            overhead = zstd_size(b"".join(node.SerializeToString() for node in rewrite.nodes))
            better = row["zstd_sparse"] + overhead <= row["zstd"] - MIN_GAIN
        if better:
            current = trial if whole else current
            row["sparse"] = used = True
        else:
            _undo(model, rewrite)
    if not used:
        graph.remove_initializers(model, added)
    return decisions


def store_pipeline_output(model: onnx.ModelProto, layers: dict) -> dict[str, dict]:
    """``store_sparse`` on a pipeline's final model; each layer whose integer weight went sparse
    says so in its record (the report's ``storage``). Bits, sparsity and params of a layer do not
    change: the decoded tensor is the dense one, value for value."""
    decisions = store_sparse(model)
    for stored, row in decisions.items():
        if not row["sparse"]:
            continue
        # every quantizer names a weight's integer tensor "<weight>_<suffix>" (graph.unique_name)
        owners = [name for name in layers if stored == name or stored.startswith(f"{name}_")]
        if owners:
            layers[max(owners, key=len)].extra["storage"] = (
                f"bitmask + {row['kept']} of {row['elements']} values (the rest {row['fill']})")
    return decisions


def find_sparse_weights(g: onnx.GraphProto) -> list[SparseWeight]:
    """The sparse-stored weights of graph ``g``: the exact decoding chain of ``_decode_nodes``
    from an initializer mask and values to the tensor it produces."""
    inits = {t.name for t in g.initializer}
    producer = {out: node for node in g.node for out in node.output}
    found = []
    for last in g.node:
        if last.op_type != "Reshape" or len(last.input) != 2 or last.input[1] not in inits:
            continue
        chain = [last]
        gather = producer.get(last.input[0])
        if gather is None or gather.op_type != "Gather" or gather.input[0] not in inits:
            continue
        chain.append(gather)
        mul = producer.get(gather.input[1])
        if mul is None or mul.op_type != "Mul":
            continue
        chain.append(mul)
        cumsum = producer.get(mul.input[0])
        cast = producer.get(mul.input[1])
        if cumsum is None or cast is None or cumsum.op_type != "CumSum" or cast.op_type != "Cast" or \
                cumsum.input[0] != cast.output[0]:
            continue
        chain += [cumsum, cast]
        node = cast
        for op in ("Slice", "Reshape", "BitShift", "BitShift"):
            node = producer.get(node.input[0])
            if node is None or node.op_type != op:
                break
            chain.append(node)
        else:
            slice_node = chain[5]
            if len(slice_node.input) != 3 or slice_node.input[2] not in inits or chain[-1].input[0] not in inits:
                continue
            found.append(SparseWeight(last.output[0], chain[-1].input[0], gather.input[0], slice_node.input[2],
                                      last.input[1], list(reversed(chain))))
    return found


def decoded_tensor(g: onnx.GraphProto, sparse: SparseWeight, read) -> onnx.TensorProto:
    """The dense tensor a sparse weight decodes to, named as the weight (``read``: TensorProto ->
    numpy array, for tensors held as external data)."""
    tensors = {t.name: t for t in g.initializer}
    count = int(np.asarray(read(tensors[sparse.count])).reshape(-1)[0])
    shape = tuple(int(d) for d in np.asarray(read(tensors[sparse.shape])).reshape(-1))
    dense = unpack(read(tensors[sparse.mask]), read(tensors[sparse.values]), count, shape)
    return numpy_helper.from_array(dense, sparse.weight)
