"""Reading the sparse storage form back (the format: ``sparse_storage``): the decoding chains a
graph holds (``find_sparse_weights``), and the dense tensors they decode to, computed with the
decoding's numpy twins (``unpack``, ``open_gap``). The storage's writer, the file layout and the
report's parameter counts all read it from here."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# where a symmetric grid's zero sits in storage: int8 0, uint8 128 (int8_storage's shifted form)
GAP_CENTER = {np.dtype(np.int8): 0, np.dtype(np.uint8): 128}


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
    offsets: str | None = None
    center: str | None = None

    def inputs(self) -> set[str]:
        return {name for node in self.nodes for name in node.input if name}



def open_gap(shifted: np.ndarray, offsets: np.ndarray, center: int | None = None) -> np.ndarray:
    """numpy twin of the gap's decoding nodes: q = v + sign(v - center) offsets, in the stored dtype
    (center: the grid's zero, by default ``GAP_CENTER`` of the dtype)."""
    wide = shifted.astype(np.int32)
    center = GAP_CENTER[shifted.dtype] if center is None else center
    return (wide + np.sign(wide - center) * offsets.astype(np.int32)).astype(shifted.dtype)


def unpack(mask: np.ndarray, values: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """numpy twin of the decoding nodes: the dense tensor of ``shape``."""
    flags = np.unpackbits(np.asarray(mask, dtype=np.uint8).reshape(-1), bitorder="little")[:count].astype(np.int64)
    index = np.cumsum(flags) * flags
    return np.asarray(values)[index].reshape(shape)



def find_sparse_weights(g: onnx.GraphProto) -> list[SparseWeight]:
    """The sparse-stored weights of graph ``g``: the exact decoding chain of ``_decode_nodes``
    from an initializer mask and values to the tensor it produces (through ``_gap_nodes`` where
    the gap was closed)."""
    inits = {t.name for t in g.initializer}
    producer = {out: node for node in g.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
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
            sparse = SparseWeight(last.output[0], chain[-1].input[0], gather.input[0], slice_node.input[2],
                                  last.input[1], list(reversed(chain)))
            found.append(_with_gap(sparse, inits, producer, readers))
    return found


def _with_gap(sparse: SparseWeight, inits: set[str], producer: dict[str, onnx.NodeProto],
              readers: dict[str, list[onnx.NodeProto]]) -> SparseWeight:
    """``sparse`` extended by the exact chain of ``_gap_nodes`` where one reads its output."""
    def only_reader(name: str, op: str) -> onnx.NodeProto | None:
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    wide = only_reader(sparse.weight, "Cast")
    if wide is None or len(readers.get(wide.output[0], [])) != 2:
        return sparse
    ops = {n.op_type: n for n in readers[wide.output[0]]}
    centered = ops.get("Sub")                        # uint8: the grid's zero is 128
    if centered is not None:
        if set(ops) != {"Sub", "Add"} or list(centered.input)[:1] != [wide.output[0]] or \
                len(centered.input) != 2 or centered.input[1] not in inits:
            return sparse
        sign = only_reader(centered.output[0], "Sign")
    else:
        sign = ops.get("Sign") if set(ops) == {"Sign", "Add"} else None
    if sign is None:
        return sparse
    mul = only_reader(sign.output[0], "Mul")
    if mul is None or len(mul.input) != 2 or mul.input[0] != sign.output[0]:
        return sparse
    offsets_cast = producer.get(mul.input[1])
    add = only_reader(mul.output[0], "Add")
    if offsets_cast is None or offsets_cast.op_type != "Cast" or offsets_cast.input[0] not in inits or \
            add is None or list(add.input) != [wide.output[0], mul.output[0]]:
        return sparse
    last = only_reader(add.output[0], "Cast")
    if last is None:
        return sparse
    tail = [wide] + ([centered] if centered is not None else []) + [sign, offsets_cast, mul, add, last]
    return SparseWeight(last.output[0], sparse.mask, sparse.values, sparse.count, sparse.shape,
                        sparse.nodes + tail, offsets=offsets_cast.input[0],
                        center=centered.input[1] if centered is not None else None)


def decoded_tensor(g: onnx.GraphProto, sparse: SparseWeight, read) -> onnx.TensorProto:
    """The dense tensor a sparse weight decodes to, named as the weight (``read``: TensorProto ->
    numpy array, for tensors held as external data)."""
    tensors = {t.name: t for t in g.initializer}
    count = int(np.asarray(read(tensors[sparse.count])).reshape(-1)[0])
    shape = tuple(int(d) for d in np.asarray(read(tensors[sparse.shape])).reshape(-1))
    dense = unpack(read(tensors[sparse.mask]), read(tensors[sparse.values]), count, shape)
    if sparse.offsets is not None:
        center = 0 if sparse.center is None else int(np.asarray(read(tensors[sparse.center])))
        dense = open_gap(dense, np.asarray(read(tensors[sparse.offsets])), center)
    return numpy_helper.from_array(dense, sparse.weight)
