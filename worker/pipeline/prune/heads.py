"""Attention heads as channels: find multi-head attention blocks whose heads can be removed whole.

Channel pruning (``prune.channels``) stops at the Reshape that splits a projection into heads:
past it a channel is no longer a position on one axis. A head is, though: removing head ``h`` removes
columns ``[h*H, (h+1)*H)`` of each of the Q, K and V projections (of each third of a packed QKV
projection), the same rows of the output projection, and one from the head count in the reshapes;
every op in between (the head transposes, the Split of a packed projection, the per-head score and
context MatMuls, the scale, a mask that is the same for every head, Softmax over the keys) works
head by head and is left as it is.

Two graph shapes are recognised, with their tensors read by nothing else:

- separate projections (what most exporters write for ``nn.MultiheadAttention``-like code)::

      q = Transpose(Reshape(Pq, [B, S, N, H]), [0, 2, 1, 3])        k: perm [0, 2, 3, 1]
      scores = MatMul(q, k) [* c | / c] [+ mask];  probs = Softmax(scores, -1)
      context = MatMul(probs, v)

- one packed projection (torch's TorchScript export of ``qkv(x).reshape(B, S, 3, N, H).permute(2, 0, 3, 1, 4)``)::

      q, k, v = Squeeze(Split(Transpose(Reshape(P, [B, S, 3, N, H]), [2, 0, 3, 1, 4]), axis 0))
      scores = MatMul(q, Transpose(k, [0, 1, 3, 2])) ...

and then ``out = MatMul(Reshape(Transpose(context, [0, 2, 1, 3]), [B, S, N*H]), Wo)``. A projection
is ``MatMul(x, W)`` with a constant 2-D ``W``, optionally followed by ``Add`` of a constant bias. The
shapes may be constants or ``Concat`` of ``Shape``-derived B, S and constant N, H (as exported).
Anything else (a per-head mask or bias, grouped-query attention, a fused Attention op) is not a site,
and its projections stay blocked as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from worker.pipeline import graph, subgraphs
from worker.pipeline.graph import attribute, opset


@dataclass(frozen=True)
class ShapeEntry:
    """Entry ``entry`` of constant ``name``, read as input ``index`` of node ``node`` (a Reshape, or
    the Concat that builds its shape), holds ``per_head`` times the number of heads."""
    node: str
    index: int
    name: str
    entry: int
    per_head: int


@dataclass(frozen=True)
class HeadSite:
    heads: int
    head_size: int
    projections: tuple[tuple[str, int], ...]   # (MatMul node, copies): its columns are copies x heads x head_size
    splits: tuple[str, ...]                    # the Reshapes that split the projections into heads
    shape_entries: tuple[ShapeEntry, ...]
    merge: str                                 # the Reshape that joins the heads again
    output: str                                # the output projection's MatMul


class _Lookup:
    def __init__(self, model: onnx.ModelProto, inits: dict[str, np.ndarray], shapes: dict[str, list]):
        self.inits = inits
        self.shapes = shapes
        self.producer = graph.producers(model)
        self.readers = {name: [node for node, _ in reads] for name, reads in graph.consumers(model).items()}
        # a tensor a graph output or an If / Loop body reads has a reader the walk cannot see
        self.outputs = {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
        self.nodes = {node.name: node for node in model.graph.node}

    def made_by(self, tensor: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op else None

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def scalar(self, tensor: str) -> bool:
        value = self.inits.get(tensor)
        return value is not None and value.size == 1

    def one_value(self, tensor: str) -> int | None:
        value = self.inits.get(tensor)
        return int(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.dtype.kind == "i" else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return [int(p) for p in attribute(node, "perm", [])]


def _shape_tail(look: _Lookup, reshape: onnx.NodeProto, length: int) -> tuple[list[int], list[ShapeEntry | None]] | None:
    """The last ``length - 2`` target dims of ``reshape`` (a target of ``length`` dims whose first two
    are kept or copied) and, for each, where its value is stored."""
    if attribute(reshape, "allowzero", 0) or len(reshape.input) < 2:
        return None
    shape = reshape.input[1]
    whole = look.inits.get(shape)
    if whole is not None:
        values = [int(v) for v in whole.reshape(-1)]
        if len(values) != length:
            return None
        return values[2:], [ShapeEntry(reshape.name, 1, shape, i, 0) for i in range(2, length)]
    concat = look.made_by(shape, "Concat")
    if concat is None or len(concat.input) != length:
        return None
    values = [look.one_value(name) for name in concat.input[2:]]
    if any(v is None for v in values):
        return None
    return values, [ShapeEntry(concat.name, i, concat.input[i], 0, 0) for i in range(2, length)]


def _projection(look: _Lookup, tensor: str) -> onnx.NodeProto | None:
    """The MatMul of ``MatMul(x, W) [+ b]`` that makes ``tensor``, with W a constant matrix and b a
    constant vector."""
    node = look.producer.get(tensor)
    if node is not None and node.op_type == "Add":
        matmul = next((look.made_by(n, "MatMul") for n in node.input if look.made_by(n, "MatMul")), None)
        if matmul is None or look.only_reader(matmul.output[0]) is not node:
            return None
        bias = node.input[1] if node.input[0] == matmul.output[0] else node.input[0]
        if bias not in look.inits or look.inits[bias].ndim != 1:
            return None
        node = matmul
    if node is None or node.op_type != "MatMul" or node.input[1] not in look.inits or look.inits[node.input[1]].ndim != 2:
        return None
    return node


def _projected_heads(look: _Lookup, transpose: onnx.NodeProto, length: int):
    """(projection, the reshape's last dims, where they are stored, the reshape) when ``transpose``
    reads ``Reshape(P, shape of `length` dims)`` of a projection P, each read by nothing else."""
    reshape = look.made_by(transpose.input[0], "Reshape")
    if reshape is None or look.only_reader(reshape.output[0]) is not transpose:
        return None
    tail = _shape_tail(look, reshape, length)
    projection = _projection(look, reshape.input[0])
    if tail is None or projection is None or look.only_reader(reshape.input[0]) is not reshape:
        return None
    return projection, tail[0], tail[1], reshape


def _separate(look: _Lookup, tensor: str, perm: list[int]):
    """(projection, heads, head_size, entries, reshape) for ``Transpose(Reshape(P, [B, S, N, H]), perm)``."""
    transpose = look.made_by(tensor, "Transpose")
    if transpose is None or _perm(transpose) != perm or look.only_reader(tensor) is None:
        return None
    found = _projected_heads(look, transpose, 4)
    if found is None:
        return None
    projection, (heads, head_size), entries, reshape = found
    entry = entries[0]
    return projection, heads, head_size, [ShapeEntry(entry.node, entry.index, entry.name, entry.entry, 1)], reshape


def _packed(look: _Lookup, parts: list[str]):
    """(projection, heads, head_size, entries, reshape) when q, k (before its transpose) and v are the three
    Squeeze(Split(Transpose(Reshape(P, [B, S, 3, N, H]), [2, 0, 3, 1, 4])))."""
    splits = []
    for tensor in parts:
        squeeze = look.made_by(tensor, "Squeeze")
        if squeeze is None or len(squeeze.input) < 2 or look.only_reader(tensor) is None:
            return None
        axes = look.inits.get(squeeze.input[1])
        split = look.made_by(squeeze.input[0], "Split")
        if axes is None or [int(a) for a in axes.reshape(-1)] != [0] or split is None:
            return None
        if look.only_reader(squeeze.input[0]) is not squeeze:
            return None
        splits.append(split)
    split = splits[0]
    if any(s is not split for s in splits) or attribute(split, "axis", 0) != 0 or len(split.output) != 3:
        return None
    if len(split.input) > 1 and split.input[1]:
        sizes = look.inits.get(split.input[1])
        if sizes is None or [int(v) for v in sizes.reshape(-1)] != [1, 1, 1]:
            return None
    transpose = look.made_by(split.input[0], "Transpose")
    if transpose is None or _perm(transpose) != [2, 0, 3, 1, 4] or look.only_reader(transpose.output[0]) is not split:
        return None
    found = _projected_heads(look, transpose, 5)
    if found is None:
        return None
    projection, (three, heads, head_size), entries, reshape = found
    if three != 3:
        return None
    entry = entries[1]
    return projection, heads, head_size, [ShapeEntry(entry.node, entry.index, entry.name, entry.entry, 1)], reshape


def _same_for_every_head(look: _Lookup, tensor: str) -> bool:
    """True when ``tensor`` broadcasts over the head axis (1) of a [B, N, S, S] score tensor."""
    if look.scalar(tensor):
        return True
    shape = look.shapes.get(tensor)
    if shape is None or len(shape) > 4:
        return False
    return len(shape) <= 2 or shape[len(shape) - 3] == 1


def _scores_matmul(look: _Lookup, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MatMul(q, k) under an optional scale by a constant and an optional mask Add before the
    Softmax (in either order)."""
    tensor = softmax.input[0]
    for _ in range(3):
        node = look.producer.get(tensor)
        if node is None or look.only_reader(tensor) is None:
            return None
        if node.op_type == "MatMul":
            return node
        if node.op_type not in ("Mul", "Div", "Add") or len(node.input) != 2:
            return None
        # the scores are the operand computed by MatMul / Mul / Div; the other is the scale or the mask
        sides = [i for i in (0, 1) if (look.producer.get(node.input[i]) is not None and
                                       look.producer[node.input[i]].op_type in ("MatMul", "Mul", "Div"))]
        if node.op_type == "Div":
            sides = [i for i in sides if i == 0]
        if not sides:
            return None
        scores, other = node.input[sides[0]], node.input[1 - sides[0]]
        if node.op_type in ("Mul", "Div") and not look.scalar(other):
            return None
        if node.op_type == "Add" and not _same_for_every_head(look, other):
            return None
        tensor = scores
    return None


def _merge(look: _Lookup, context: onnx.NodeProto, heads: int, head_size: int):
    """(merge Reshape, output MatMul, entries) for MatMul(Reshape(Transpose(context, [0, 2, 1, 3]),
    [B, S, N*H]), Wo)."""
    transpose = look.only_reader(context.output[0])
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = look.only_reader(transpose.output[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] != transpose.output[0]:
        return None
    tail = _shape_tail(look, reshape, 3)
    output = look.only_reader(reshape.output[0])
    if tail is None or output is None or output.op_type != "MatMul" or output.input[0] != reshape.output[0]:
        return None
    weight = look.inits.get(output.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[0] != heads * head_size:
        return None
    (width,), (entry,) = tail
    if width == heads * head_size:
        entries = [ShapeEntry(entry.node, entry.index, entry.name, entry.entry, head_size)]
    elif width == -1:
        entries = []
    else:
        return None
    return reshape, output, entries


def find_head_sites(model: onnx.ModelProto, inits: dict[str, np.ndarray], shapes: dict[str, list]) -> list[HeadSite]:
    """Every attention block of ``model`` whose heads can be removed whole (see the module docstring).
    ``inits`` must hold every constant (Constant nodes turned into initializers)."""
    look = _Lookup(model, inits, shapes)
    # before opset 13 Softmax's default axis is 1, over [N, S, S] flattened: across the heads
    default_axis = -1 if opset(model) >= 13 else 1
    sites = []
    for softmax in model.graph.node:
        if softmax.op_type != "Softmax" or attribute(softmax, "axis", default_axis) not in (-1, 3):
            continue
        if len(shapes.get(softmax.input[0]) or []) != 4:
            continue
        context = look.only_reader(softmax.output[0])
        scores = _scores_matmul(look, softmax)
        if context is None or context.op_type != "MatMul" or context.input[0] != softmax.output[0] or scores is None:
            continue
        q, k, v = scores.input[0], scores.input[1], context.input[1]
        found = [_separate(look, q, [0, 2, 1, 3]), _separate(look, k, [0, 2, 3, 1]), _separate(look, v, [0, 2, 1, 3])]
        if all(found):
            projections = tuple((f[0].name, 1) for f in found)
            if len({f[0].name for f in found}) != 3 or len({(f[1], f[2]) for f in found}) != 1:
                continue
            heads, head_size = found[0][1], found[0][2]
            entries = [e for f in found for e in f[3]]
            splits = tuple(f[4].name for f in found)
        else:
            k_t = look.made_by(k, "Transpose")
            if k_t is None or _perm(k_t) != [0, 1, 3, 2] or look.only_reader(k) is not scores:
                continue
            packed = _packed(look, [q, k_t.input[0], v])
            if packed is None:
                continue
            projection, heads, head_size, entries, head_split = packed
            projections = ((projection.name, 3),)
            splits = (head_split.name,)
        columns = [(look.inits[look.nodes[name].input[1]].shape[1], copies) for name, copies in projections]
        if heads < 2 or head_size < 1 or any(width != copies * heads * head_size for width, copies in columns):
            continue
        merged = _merge(look, context, heads, head_size)
        if merged is None:
            continue
        reshape, output, merge_entries = merged
        sites.append(HeadSite(heads, head_size, projections, splits, tuple(entries + merge_entries), reshape.name,
                              output.name))
    return sites
