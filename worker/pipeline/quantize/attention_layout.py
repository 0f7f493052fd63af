"""Attention head split without copies: the packed QKV projection's reshape / transpose / split
becomes three projections in sequence-major layout read by FusedMatMul's batch transposes.

The pattern (what torch's TorchScript exporter writes for ``qkv(x).reshape(B, S, 3, N, H)
.permute(2, 0, 3, 1, 4)``, ``q @ k.transpose(-1, -2) * c``, ``softmax(. + mask)``, ``. @ v``)::

    P = proj(x)                                  x [B, S, K], P [B, S, 3*N*H]
    q, k, v = Squeeze(Split(Transpose(Reshape(P, [B, S, 3, N, H]), [2, 0, 3, 1, 4]), axis 0))
    scores = MatMul(q, Transpose(k, [0, 1, 3, 2])) * c          (or / c)
    probs = Softmax(scores + mask, axis -1)
    out = MatMul(probs, v)                       [B, N, S, H]

becomes::

    xt = x with its first two axes swapped       [S, B, K]  (for int8: the uint8 tensor, 1 byte a value)
    q, k, v = Reshape(proj_q(xt), [0, 0, N, H]), ...         [S, B, N, H] each, no copy
    scores = FusedMatMul(q, k, alpha=c, transB=1, transBatchA=1, transBatchB=1)   [B, N, S, S]
    probs = Softmax(scores + mask)               (the original nodes)
    out = FusedMatMul(probs, v, transBatchB=1)   [B, N, S, H]

``transBatchA`` reads A [d0, d1, d2, d3] as [d1, d2, d0, d3]: for [S, B, N, H] that is the per-head
[B, N, S, H] view, walked with a row stride instead of materialised. What goes away per layer:
the Split (a full copy of P) and the three head transposes; what comes in: one transpose of the
projection's input. This runs on the float graph, before quantization; the dynamic step then
quantizes the three projections, and ``shared_quantization`` quantizes their common input once and
moves that transpose after the quantization (uint8: a quarter of the bytes).

Exactness: every value is computed by the same arithmetic on the same operands. The three
projections are MatMul + Add on the weight's and bias's column thirds (each output element is the
same dot product); ``alpha=c`` is what ONNX Runtime's own MatMulScaleFusion makes of ``MatMul * c``
on the original model (for ``/ c`` it is ``1 / c``, as there). Only this exact shape of graph is
rewritten; anything else (other permutations, a tensor read elsewhere, a non-constant scale, an
input of unknown rank) stays as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import graph, subgraphs

MS_DOMAIN = "com.microsoft"


@dataclass
class _Projection:
    """The packed QKV projection feeding the head split: MatMul(x, W) [+ bias Add]."""
    x: str
    nodes: list[onnx.NodeProto]
    weight: str
    bias: str = ""


@dataclass
class _Match:
    projection: _Projection
    heads: int
    head_size: int
    alpha: float
    removed: list[onnx.NodeProto]
    scores_out: str                 # the scaled scores tensor (what the mask Add reads)
    context: onnx.NodeProto         # MatMul(probs, v)


class _Graph:
    """Lookups over one model, rebuilt after each rewrite."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list]):
        self.model = model
        self.producer = graph.producers(model)
        self.readers = graph.consumers(model)
        self.inits = graph.initializers(model)
        self.outputs = {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
        self.shapes = shapes

    def rank(self, tensor: str) -> int | None:
        return len(self.shapes[tensor]) if tensor in self.shapes else None

    def same_dim(self, a: str, b: str, axis: int) -> bool:
        """True when shape inference proves dim ``axis`` of a and b equal (one name or one size)."""
        da, db = self.shapes.get(a), self.shapes.get(b)
        if da is None or db is None or len(da) <= axis or len(db) <= axis:
            return False
        return da[axis] is not None and da[axis] != 0 and da[axis] == db[axis]

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.readers.get(tensor, [])
        if len(readers) != 1 or tensor in self.outputs:
            return None
        return readers[0][0]

    def constant(self, tensor: str) -> np.ndarray | None:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            value = graph.attribute(node, "value")
            return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else None
        return None

    def made_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None


def _shapes(model: onnx.ModelProto) -> dict[str, list[str | int | None]]:
    """Tensor dims as ONNX shape inference sees them (a dim_param name, a size, or None). Contrib ops
    make it stop early; what it could not reach is simply unknown, and unknown means no rewrite."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:               # inference is advisory here; without it nothing is rewritten
        inferred = model
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _scale_factor(g: _Graph, scaled: onnx.NodeProto) -> tuple[str, float] | None:
    """(scores before scaling, alpha) for ``Mul(s, c)`` / ``Mul(c, s)`` / ``Div(s, c)`` with a scalar c."""
    if scaled.op_type not in ("Mul", "Div"):
        return None
    for index in ((0, 1) if scaled.op_type == "Mul" else (0,)):
        c = g.constant(scaled.input[1 - index])
        if c is not None and c.size == 1 and c.dtype == np.float32:
            value = np.float32(c.reshape(()))
            alpha = value if scaled.op_type == "Mul" else np.float32(1) / value
            return scaled.input[index], float(alpha)
    return None


def _projection(g: _Graph, packed: str) -> _Projection | None:
    node = g.producer.get(packed)
    if node is None:
        return None
    nodes, bias = [], ""
    if node.op_type == "Add":
        matmul = next((g.made_by(name, "MatMul") for name in node.input if g.made_by(name, "MatMul")), None)
        if matmul is None or g.only_reader(matmul.output[0]) is not node:
            return None
        bias = node.input[1] if node.input[0] == matmul.output[0] else node.input[0]
        b = g.constant(bias)
        if bias not in g.inits or b is None or b.ndim != 1:
            return None
        nodes, node = [node], matmul
    if node.op_type != "MatMul" or node.input[1] not in g.inits:
        return None
    return _Projection(node.input[0], [node] + nodes, node.input[1], bias=bias)


def _copies_dim(g: _Graph, part: str, axis: int, x: str, packed: str) -> bool:
    """True when ``part`` is Unsqueeze(Gather(Shape(t), axis)) for a t that is the packed
    projection's input or output, or one shape inference proves has the same dim there (the block
    input before a LayerNormalization, say): the reshape keeps that dim as it is."""
    unsqueeze = g.made_by(part, "Unsqueeze")
    gather = g.made_by(unsqueeze.input[0], "Gather") if unsqueeze is not None else None
    shape = g.made_by(gather.input[0], "Shape") if gather is not None else None
    if shape is None or graph.attribute(gather, "axis", 0) != 0:
        return False
    source = shape.input[0]
    if source not in (x, packed) and not g.same_dim(source, x, axis):
        return False
    if graph.attribute(shape, "start", 0) != 0:
        return False
    index = g.constant(gather.input[1])
    return index is not None and index.size == 1 and int(index.reshape(())) == axis


def _head_shape(g: _Graph, shape_tensor: str, x: str, packed: str) -> tuple[int, int] | None:
    """(N, H) when the reshape target is [B, S, 3, N, H] with B, S the packed projection's own
    leading dims (0 entries of a constant shape, or Shape / Gather parts of a Concat) and 3, N, H
    constants. Anything else could regroup rows, which the rewrite's [0, 0, N, H] would not."""
    whole = g.constant(shape_tensor)
    if whole is not None:
        values = [int(v) for v in whole.reshape(-1)]
        if len(values) != 5 or values[:2] != [0, 0]:
            return None
        tail = values[2:]
    else:
        concat = g.made_by(shape_tensor, "Concat")
        if concat is None or len(concat.input) != 5:
            return None
        if not all(_copies_dim(g, concat.input[axis], axis, x, packed) for axis in (0, 1)):
            return None
        parts = [g.constant(name) for name in concat.input[2:]]
        if any(p is None or p.size != 1 for p in parts):
            return None
        tail = [int(p.reshape(-1)[0]) for p in parts]
    if tail is None or tail[0] != 3 or tail[1] <= 0 or tail[2] <= 0:
        return None
    return tail[1], tail[2]


def _split_is_three_equal(g: _Graph, split: onnx.NodeProto) -> bool:
    if graph.attribute(split, "axis", 0) != 0 or len(split.output) != 3:
        return False
    if len(split.input) > 1 and split.input[1]:
        sizes = g.constant(split.input[1])
        return sizes is not None and [int(v) for v in sizes.reshape(-1)] == [1, 1, 1]
    return graph.attribute(split, "num_outputs", 3) == 3


def _squeezed_part(g: _Graph, tensor: str) -> tuple[onnx.NodeProto, onnx.NodeProto, int] | None:
    """(Squeeze, Split, output index) when ``tensor`` is Squeeze(Split(...)[i], axes [0])."""
    squeeze = g.made_by(tensor, "Squeeze")
    if squeeze is None or len(squeeze.input) < 2:
        return None
    axes = g.constant(squeeze.input[1])
    split = g.made_by(squeeze.input[0], "Split")
    if axes is None or [int(a) for a in axes.reshape(-1)] != [0] or split is None:
        return None
    if g.only_reader(squeeze.input[0]) is not squeeze or g.only_reader(tensor) is None:
        return None
    return squeeze, split, list(split.output).index(squeeze.input[0])


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Match | None:
    if graph.attribute(softmax, "axis", -1) not in (-1, 3) or g.rank(softmax.input[0]) != 4:
        return None
    add = g.made_by(softmax.input[0], "Add")
    context = g.only_reader(softmax.output[0])
    if add is None or g.only_reader(add.output[0]) is not softmax or context is None:
        return None
    if context.op_type != "MatMul" or context.input[0] != softmax.output[0]:
        return None
    for scores_index in (0, 1):
        scaled = g.producer.get(add.input[scores_index])
        if scaled is not None and g.only_reader(scaled.output[0]) is add and _scale_factor(g, scaled):
            break
    else:
        return None
    raw, alpha = _scale_factor(g, scaled)
    qk = g.made_by(raw, "MatMul")
    if qk is None or g.only_reader(raw) is not scaled:
        return None
    k_t = g.made_by(qk.input[1], "Transpose")
    if k_t is None or list(graph.attribute(k_t, "perm", [])) != [0, 1, 3, 2] or g.only_reader(k_t.output[0]) is not qk:
        return None
    parts = [_squeezed_part(g, name) for name in (qk.input[0], k_t.input[0], context.input[1])]
    if any(p is None for p in parts) or [p[2] for p in parts] != [0, 1, 2] or len({id(p[1]) for p in parts}) != 1:
        return None
    split = parts[0][1]
    if not _split_is_three_equal(g, split):
        return None
    transpose = g.made_by(split.input[0], "Transpose")
    if transpose is None or list(graph.attribute(transpose, "perm", [])) != [2, 0, 3, 1, 4]:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    if reshape is None or g.only_reader(transpose.output[0]) is not split or g.only_reader(reshape.output[0]) is not transpose:
        return None
    if graph.attribute(reshape, "allowzero", 0):
        return None
    projection = _projection(g, reshape.input[0])
    if projection is None or g.only_reader(reshape.input[0]) is not reshape:
        return None
    heads = _head_shape(g, reshape.input[1], projection.x, reshape.input[0])
    if heads is None:
        return None
    if g.rank(projection.x) != 3:
        return None
    width = heads[0] * heads[1]
    weight = g.inits[projection.weight]
    if len(weight.dims) != 2 or weight.dims[1] != 3 * width:
        return None
    removed = projection.nodes + [reshape, transpose, split] + [p[0] for p in parts] + [k_t, qk, scaled, context]
    return _Match(projection, heads[0], heads[1], alpha, removed, scaled.output[0], context)


def _column_third(g: _Graph, model: onnx.ModelProto, tensor: str, third: int, width: int, suffix: str) -> str:
    """A new initializer holding columns [third*width, (third+1)*width) of ``tensor`` (its last axis)."""
    if not tensor:
        return ""
    array = numpy_helper.to_array(g.inits[tensor])
    part = np.ascontiguousarray(array[..., third * width:(third + 1) * width])
    name = graph.unique_name(model, f"{tensor}_{suffix}")
    model.graph.initializer.append(numpy_helper.from_array(part, name))
    return name


def _rewrite(model: onnx.ModelProto, g: _Graph, m: _Match, index: int) -> list[str]:
    p = m.projection
    width = m.heads * m.head_size
    base = m.context.name or f"attention_{index}"
    name = lambda suffix: graph.unique_name(model, f"{base}_{suffix}")    # noqa: E731
    new: list[onnx.NodeProto] = []
    swapped = name("x_seq_major")
    new.append(helper.make_node("Transpose", [p.x], [swapped], name=name("seq_major"), perm=[1, 0, 2]))
    head_shape = name("head_shape")
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, m.heads, m.head_size], np.int64), head_shape))
    per_head, weights = [], []
    for third, role in enumerate("qkv"):
        weight = _column_third(g, model, p.weight, third, width, role)
        weights.append(weight)
        bias = _column_third(g, model, p.bias, third, width, role)
        projected = name(f"{role}_seq_major")
        # The projection keeps the packed projection's node name with a q / k / v suffix.
        proj_name = graph.unique_name(model, f"{p.nodes[0].name}_{role}")
        if bias:
            unbiased = name(f"{role}_seq_major_nobias")
            new.append(helper.make_node("MatMul", [swapped, weight], [unbiased], name=proj_name))
            new.append(helper.make_node("Add", [unbiased, bias], [projected], name=name(f"{role}_bias")))
        else:
            new.append(helper.make_node("MatMul", [swapped, weight], [projected], name=proj_name))
        heads = name(f"{role}_heads")
        new.append(helper.make_node("Reshape", [projected, head_shape], [heads], name=name(f"{role}_split_heads")))
        per_head.append(heads)
    new.append(helper.make_node("FusedMatMul", [per_head[0], per_head[1]], [m.scores_out], name=name("scores"),
                                domain=MS_DOMAIN, alpha=m.alpha, transA=0, transB=1, transBatchA=1, transBatchB=1))
    new.append(helper.make_node("FusedMatMul", [m.context.input[0], per_head[2]], [m.context.output[0]],
                                name=name("context"), domain=MS_DOMAIN, alpha=1.0, transA=0, transB=0,
                                transBatchA=0, transBatchB=1))
    position = min(list(model.graph.node).index(n) for n in m.removed)
    for node in m.removed:
        model.graph.node.remove(node)
    for offset, node in enumerate(new):
        model.graph.node.insert(position + offset, node)
    return weights


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes nothing reads any more (the shape arithmetic that fed the removed Reshape) and
    the initializers only they read."""
    keep = {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
    while True:
        read = {name for node in model.graph.node for name in node.input} | keep
        dead = [node for node in model.graph.node if not any(o in read for o in node.output if o)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    read = {name for node in model.graph.node for name in node.input} | keep
    unused = {t.name for t in model.graph.initializer if t.name not in read}
    graph.remove_initializers(model, unused)
    # Older models list initializers among the graph inputs too; a dropped one must go there as well.
    kept_inputs = [v for v in model.graph.input if v.name not in unused]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)


def fuse_attention_heads(model: onnx.ModelProto, weights: set[str] | None = None) -> dict[str, list[str]]:
    """Rewrite every matching attention block in place (see the module docstring), only those whose
    packed projection weight is in ``weights`` when given. Returns {packed weight: [its q, k, v
    column-third weights]} for the blocks rewritten."""
    split: dict[str, list[str]] = {}
    # Shapes from the graph as it came: ONNX shape inference stops at the contrib ops a rewrite
    # adds, and the tensors the match reads (x, the scores, shape sources) keep their names.
    shapes = _shapes(model)
    while True:
        g = _Graph(model, shapes)
        candidates = (_match(g, node) for node in model.graph.node if node.op_type == "Softmax")
        found = next((m for m in candidates
                      if m is not None and (weights is None or m.projection.weight in weights)), None)
        if found is None:
            break
        split[found.projection.weight] = _rewrite(model, g, found, len(split))
    if split:
        _drop_dead(model)
        graph.ensure_domain(model, MS_DOMAIN, 1)
        graph.sort_graph(model)
    return split
