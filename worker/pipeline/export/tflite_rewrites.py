"""ONNX-level rewrites made before onnx2tf sees a transformer encoder: the same function in float,
written in ops that onnx2tf and LiteRT's builtins convert right.

- ``erf_gelus_as_gelu``: PyTorch exports GELU as ``0.5 * x * (1 + erf(x / sqrt(2)))``; LiteRT has
  no builtin Erf (a full-integer conversion refuses it), but it has GELU. The five nodes become one
  ``com.microsoft::Gelu`` (ONNX Runtime's contrib op, the same erf formula, so the rewritten graph
  still runs there; onnx2tf dispatches on the op type and writes ``tf.nn.gelu(approximate=False)``,
  LiteRT's exact GELU). Not the tanh approximation.
- ``bool_wheres_as_arithmetic``: ``Where(mask, x, y)`` on a bool mask of rank 4 (a BERT attention
  mask broadcast to [batch, heads, seq, seq]) becomes ``y + m * (x - y)`` with ``m = Cast(mask)``,
  only where ``x`` and ``y`` are finite constants (then ``m`` in {0, 1} gives exactly x or y; an
  infinite one would make 0 * inf = NaN): onnx2tf lays a 4-D bool tensor out as NHWC and TensorFlow
  has no int8 select, so the mask is kept in float arithmetic the converter quantizes like any other.
- ``shape_computations_folded``: with the inputs' shapes fixed (the file takes one sample's
  shapes), every value computed from shapes and constants alone (a transformers export's
  ``Shape -> Gather -> Concat -> Reshape`` of the attention heads) becomes the constant it is;
  onnx2tf, which keeps its own transposed layout for each tensor, mis-reads such computed shapes
  (all-MiniLM-L6-v2's heads came out as [0, 42, 32, 32] instead of [1, 12, 42, 42]).
- ``constant_first_adds_swapped``: ``Add(constant, x)`` (how PyTorch writes a Linear's bias after
  its MatMul) as ``Add(x, constant)``: onnx2tf broadcasts a constant first operand against the
  transposed layout it keeps for x and misplaces the bias.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import graph as graph_mod, subgraphs

SQRT2 = math.sqrt(2.0)
TOLERANCE = 1e-5        # how close an exported constant must be to 1/sqrt(2), 1, 0.5


def _scalar(model: onnx.ModelProto, name: str) -> float | None:
    inits = graph_mod.initializers(model)
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _near(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= TOLERANCE * max(1.0, abs(want))


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node that reads ``name``."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _only_reader(readers: dict, name: str, op: str) -> onnx.NodeProto | None:
    nodes = readers.get(name, [])
    return nodes[0][0] if len(nodes) == 1 and nodes[0][0].op_type == op else None


def _gelu_match(model: onnx.ModelProto, erf: onnx.NodeProto, producers: dict, readers: dict):
    """(x, the nodes of the GELU, its output) for an Erf inside ``0.5 * x * (1 + erf(x / sqrt 2))``
    (the 0.5 applied to x first or to the product last), else None."""
    scaled = producers.get(erf.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul") or len(scaled.input) != 2:
        return None
    x = scaled.input[0]
    factor = _scalar(model, scaled.input[1])
    if not (_near(factor, SQRT2) if scaled.op_type == "Div" else _near(factor, 1.0 / SQRT2)):
        return None
    plus_one = _only_reader(readers, erf.output[0], "Add")
    if plus_one is None or not _near(_scalar(model, _other(plus_one, erf.output[0]) or ""), 1.0):
        return None
    product = _only_reader(readers, plus_one.output[0], "Mul")
    if product is None:
        return None
    partner = _other(product, plus_one.output[0])
    if partner == x:                             # x * (1 + erf) then * 0.5
        half = _only_reader(readers, product.output[0], "Mul")
        if half is None or not _near(_scalar(model, _other(half, product.output[0]) or ""), 0.5):
            return None
        return x, [scaled, erf, plus_one, product, half], half.output[0]
    halved = producers.get(partner or "")      # (0.5 * x) * (1 + erf)
    if halved is not None and halved.op_type == "Mul" and x in halved.input \
            and _near(_scalar(model, _other(halved, x) or ""), 0.5) and len(readers.get(halved.output[0], [])) == 1:
        return x, [scaled, erf, plus_one, halved, product], product.output[0]
    return None


def _replace(model: onnx.ModelProto, removed: set[tuple[str, ...]], added: dict[tuple[str, ...], list]) -> None:
    """Drop the nodes keyed in ``removed``; put ``added[key]`` where the node ``key`` stood."""
    kept = []
    for node in model.graph.node:
        key = tuple(node.output)
        kept += added.get(key, [])
        if key not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def erf_gelus_as_gelu(model: onnx.ModelProto) -> int:
    """Each erf GELU as one ``com.microsoft::Gelu``, in place; returns how many."""
    producers = graph_mod.producers(model)
    readers = graph_mod.consumers(model)
    outputs = {o.name for o in model.graph.output}
    removed: set[tuple[str, ...]] = set()
    added: dict[tuple[str, ...], list] = {}
    for erf in [node for node in model.graph.node if node.op_type == "Erf"]:
        match = _gelu_match(model, erf, producers, readers)
        if match is None:
            continue
        x, nodes, result = match
        # the intermediate values must have no other reader (the match checked the chain's own)
        if any(out in outputs for node in nodes[:-1] for out in node.output):
            continue
        removed |= {tuple(node.output) for node in nodes}
        added[tuple(nodes[-1].output)] = [helper.make_node("Gelu", [x], [result], domain="com.microsoft",
                                                           name=graph_mod.unique_name(model, f"{erf.name}_gelu"))]
    if added:
        graph_mod.ensure_domain(model, "com.microsoft", 1)
        _replace(model, removed, added)
    return len(added)


def _constant_finite(model: onnx.ModelProto, name: str) -> bool:
    inits = graph_mod.initializers(model)
    return name in inits and bool(np.isfinite(numpy_helper.to_array(inits[name])).all())


def bool_wheres_as_arithmetic(model: onnx.ModelProto, types: dict[str, int], ranks: dict[str, int]) -> int:
    """Each ``Where`` on a rank-4 bool mask choosing between finite constants as
    ``y + Cast(mask, float) * (x - y)``, in place; returns how many."""
    added: dict[tuple[str, ...], list] = {}
    removed: set[tuple[str, ...]] = set()
    for node in model.graph.node:
        if node.op_type != "Where" or ranks.get(node.input[0]) != 4 or types.get(node.input[0]) != onnx.TensorProto.BOOL:
            continue
        if not (_constant_finite(model, node.input[1]) and _constant_finite(model, node.input[2])):
            continue
        x, y = graph_mod.get_array(model, node.input[1]), graph_mod.get_array(model, node.input[2])
        if x.dtype != np.float32 or y.dtype != np.float32:
            continue
        base = node.name or node.output[0]
        mask, step, delta, low = (graph_mod.unique_name(model, f"{base}_{suffix}") for suffix in ("mask", "step", "delta", "low"))
        # x - y computed here in float64 then stored: exactly representable when one of them is 0
        # (the mask's 0 / finfo.min); otherwise rounded once, as the Sub would
        model.graph.initializer.extend([numpy_helper.from_array((x.astype(np.float64) - y).astype(np.float32), delta),
                                        numpy_helper.from_array(y, low)])
        added[tuple(node.output)] = [
            helper.make_node("Cast", [node.input[0]], [mask], to=onnx.TensorProto.FLOAT, name=f"{base}_as_float"),
            helper.make_node("Mul", [mask, delta], [step], name=f"{base}_scaled"),
            helper.make_node("Add", [step, low], [node.output[0]], name=f"{base}_select"),
        ]
        removed.add(tuple(node.output))
    _replace(model, removed, added)
    return len(added)


def constant_first_adds_swapped(model: onnx.ModelProto) -> int:
    """``Add(constant, x)`` as ``Add(x, constant)`` (Add commutes: the same values); returns how many."""
    inits = graph_mod.initializers(model)
    count = 0
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and node.input[0] in inits and node.input[1] not in inits:
            node.input[0], node.input[1] = node.input[1], node.input[0]
            count += 1
    return count


SHAPE_SOURCES = ("Shape", "Size")


def shape_computations_folded(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Each value that depends on the inputs' shapes only (through Shape / Size) and is read by a
    node that depends on values, as an initializer of its value for ``feeds``' shapes; the nodes
    left without a reader go. In place; returns how many values were folded."""
    from worker.pipeline.export.inline_if import evaluate

    known = {t.name for t in model.graph.initializer}
    shape_only: set[str] = set()
    for node in model.graph.node:
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if has_subgraph:
            continue
        if node.op_type in SHAPE_SOURCES or (node.input and all(not n or n in known or n in shape_only for n in node.input)) \
                or (not node.input and node.op_type == "Constant"):
            shape_only.update(out for out in node.output if out)
    shape_only -= known
    frontier = sorted({name for node in model.graph.node if not set(node.output) & shape_only
                       for name in node.input if name in shape_only}
                      | {o.name for o in model.graph.output if o.name in shape_only})
    if not frontier:
        return 0
    reshapes = [node for node in model.graph.node if node.op_type == "Reshape"]
    values = evaluate(model, feeds, frontier + [node.output[0] for node in reshapes])
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(values[name]), name) for name in frontier)
    folded = set(frontier)
    kept = [node for node in model.graph.node if not set(node.output) & folded]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    # a Reshape's -1 / 0 written out as the size it stands for: onnx2tf resolves them against its
    # own (transposed) layout of the input
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.output[0] not in values:
            continue
        target = graph_mod.get_array(model, node.input[1]) if node.input[1] in graph_mod.initializers(model) else None
        if target is not None and (target <= 0).any():
            name = graph_mod.unique_name(model, f"{node.input[1]}_explicit")
            model.graph.initializer.append(numpy_helper.from_array(
                np.array(np.shape(values[node.output[0]]), np.int64), name))
            node.input[1] = name
    _drop_unread(model)
    return len(frontier)


def _drop_unread(model: onnx.ModelProto) -> None:
    """Nodes and initializers nobody reads any more, removed (repeatedly: a chain goes whole)."""
    outputs = {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
    while True:
        read = {name for node in model.graph.node for name in node.input} | outputs
        kept = [node for node in model.graph.node if any(out in read for out in node.output)]
        if len(kept) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(kept)
    inits = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
