"""Weights inside If / Loop / Scan bodies that no step could see, made main-graph initializers.

``subgraphs.hoist_weights`` moves a body's *initializers* to the main graph. Two other shapes of a
body weight are common in shipped models and were left float (or made a model with every layer in
a branch look weightless, so static int8 refused it):

* the weight is a ``Constant`` node inside the body, at any depth (silero-vad's ``silero_vad.onnx``:
  both networks inside an ``If`` on the sample rate, every weight a Constant in the branches);
* the weight is *computed* from constants by layout ops (PyTorch's LSTM export re-orders the gates
  of ``weight_ih`` / ``weight_hh`` with Slice / Concat / Unsqueeze inside the branch, so the LSTM's
  W and R are node outputs, not tensors).

``lift_body_weights`` evaluates each such constant cone once (``onnx.reference``: layout ops only,
so the values are exact) and puts the result in the main graph as an initializer the body reads
from the outer scope: a single Constant keeps its own name (the Constant node goes), a computed
weight gets a fresh name and the layer reads it. Equal results (the same LSTM weights in both
branches of an ``If``) share one initializer, so nothing is stored twice. Nodes and tensors the
cones leave unread are removed. From there ``graph.body_layers`` finds the weights like any other
outer-scope weight read from a body.

A cone whose large float source something else still reads is left alone: folding it would store
the weight twice (float source + folded copy) and make the file bigger, not smaller.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core import onnx_weights
from worker.pipeline import graph, subgraphs

# Where a layer reads its weight (the positions ``graph._weight_axes`` knows), and a recurrent
# cell's bias B: folded too, since its gate re-ordering is the same Slice / Concat chain (nodes the
# file would otherwise keep, twice when both branches of an If run the cell). Ops that only move or
# re-shape values: folding them is exact. Both decided in core, so the upload counts what is lifted.
WEIGHT_INPUTS = onnx_weights.WEIGHT_INPUTS
LAYOUT_OPS = onnx_weights.LAYOUT_OPS
# a float source this large that another reader keeps would be stored twice by a fold
SHARED_SOURCE_ELEMENTS = 1024


@dataclass
class _Scope:
    """One graph (main or body) and what it defines, with its enclosing scope."""

    graph: onnx.GraphProto
    parent: "_Scope | None"
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, g: onnx.GraphProto, parent: "_Scope | None") -> "_Scope":
        return cls(g, parent, {name: node for node in g.node for name in node.output if name},
                   {t.name: t for t in g.initializer}, {v.name for v in g.input})

    def resolve(self, name: str) -> tuple["_Scope", onnx.NodeProto | onnx.TensorProto | None] | None:
        """(scope, producer node or initializer; None for a graph input) of ``name``, innermost first."""
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.inputs and name not in scope.inits:
                return scope, None
            if name in scope.producers:
                return scope, scope.producers[name]
            if name in scope.inits:
                return scope, scope.inits[name]
            scope = scope.parent
        return None


@dataclass
class _Cone:
    """A weight input of a layer in a body and the constant nodes / tensors that compute it."""

    scope: _Scope
    layer: onnx.NodeProto
    index: int
    nodes: list[tuple[_Scope, onnx.NodeProto]]        # producers in evaluation order (Constants included)
    leaves: dict[str, onnx.TensorProto]               # initializers read, by name

    @property
    def single_constant(self) -> bool:
        return len(self.nodes) == 1 and self.nodes[0][1].op_type == "Constant" and not self.leaves


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    return attr.t if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR else None


def _trace(scope: _Scope, name: str, cone: _Cone, seen: set[int], depth: int = 0) -> bool:
    """Add what computes ``name`` to ``cone``; False when it is not a constant computed by layout ops."""
    if not name:
        return True
    found = scope.resolve(name)
    if found is None or found[1] is None or depth > 32:
        return False
    owner, producer = found
    if isinstance(producer, onnx.TensorProto):
        cone.leaves[name] = producer
        return True
    if id(producer) in seen:
        return True
    if producer.op_type == "Constant":
        if _constant_value(producer) is None:
            return False
    elif producer.op_type not in LAYOUT_OPS or producer.domain not in ("", "ai.onnx") or \
            any(True for _ in subgraphs.bodies(producer)):
        return False
    elif not all(_trace(owner, inner, cone, seen, depth + 1) for inner in producer.input):
        return False
    seen.add(id(producer))
    cone.nodes.append((owner, producer))
    return True


def _cones(model: onnx.ModelProto) -> list[_Cone]:
    """Every weight input of a layer inside a body, at any depth, that constants compute (not
    already a plain initializer: those ``hoist_weights`` and the outer scope cover)."""
    found: list[_Cone] = []

    def visit(scope: _Scope) -> None:
        for node in scope.graph.node:
            if scope.parent is not None and node.domain in ("", "ai.onnx"):
                for index in WEIGHT_INPUTS.get(node.op_type, ()):
                    if index >= len(node.input) or not node.input[index]:
                        continue
                    resolved = scope.resolve(node.input[index])
                    if resolved is None or not isinstance(resolved[1], onnx.NodeProto):
                        continue
                    cone = _Cone(scope, node, index, [], {})
                    if _trace(scope, node.input[index], cone, set()):
                        found.append(cone)
            for body in subgraphs.bodies(node):
                visit(_Scope.of(body, scope))

    visit(_Scope.of(model.graph, None))
    return found


def _largest_float_source(cone: _Cone) -> str | None:
    """The name of the largest float tensor a cone reads (an initializer or a Constant's output):
    what a computed weight is named after (``model.decoder.rnn.weight_ih`` -> ``..._LSTM_W``)."""
    sources = [(name, tensor) for name, tensor in cone.leaves.items()]
    sources += [(node.output[0], value) for _, node in cone.nodes if (value := _constant_value(node)) is not None]
    floats = [(int(np.prod(tensor.dims)), name) for name, tensor in sources if tensor.data_type in subgraphs.FLOAT_TYPES]
    return max(floats)[1] if floats else None


def _evaluate(model: onnx.ModelProto, cone: _Cone) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    target = cone.layer.input[cone.index]
    probe = helper.make_model(
        helper.make_graph([node for _, node in cone.nodes], "cone", [], [helper.make_empty_tensor_value_info(target)],
                          list(cone.leaves.values())),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        value = np.asarray(ReferenceEvaluator(probe).run(None, {})[0])
    except Exception:       # an op or attribute the reference runtime lacks: leave the weight as it is
        return None
    return value if value.dtype in (np.float32, np.float16) else None


def _read_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs, anywhere in the model, read each name."""
    counts: dict[str, int] = {}
    for g in [model.graph, *subgraphs.all_bodies(model)]:
        for node in g.node:
            for name in node.input:
                if name:
                    counts[name] = counts.get(name, 0) + 1
    return counts


def _definitions(model: onnx.ModelProto) -> dict[str, int]:
    """How many times each name is defined (node output, initializer, graph input), at any depth."""
    counts: dict[str, int] = {}
    for g in [model.graph, *subgraphs.all_bodies(model)]:
        names = [o for n in g.node for o in n.output if o] + [t.name for t in g.initializer] + [v.name for v in g.input]
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _shared_sources(cones: list[_Cone], reads: dict[str, int]) -> set[str]:
    """Large float sources of the cones that something outside every cone also reads."""
    inside: dict[str, int] = {}
    counted: set[int] = set()
    for cone in cones:
        for _, node in cone.nodes:
            if id(node) in counted:
                continue
            counted.add(id(node))
            for name in node.input:
                if name:
                    inside[name] = inside.get(name, 0) + 1
    shared = set()
    for cone in cones:
        sources = dict(cone.leaves)
        sources.update({node.output[0]: value for _, node in cone.nodes if (value := _constant_value(node)) is not None})
        for name, tensor in sources.items():
            big = tensor.data_type in subgraphs.FLOAT_TYPES and int(np.prod(tensor.dims)) >= SHARED_SOURCE_ELEMENTS
            # the layer reading a single Constant directly is no other reader: that Constant keeps its name
            if big and not cone.single_constant and reads.get(name, 0) > inside.get(name, 0):
                shared.add(name)
    return shared


def _remove_dead(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove, repeatedly, nodes of bodies and initializers named in ``candidates`` (the cones'
    parts) that nothing reads any more."""
    while True:
        reads = _read_counts(model)
        outputs = {o.name for g in [model.graph, *subgraphs.all_bodies(model)] for o in g.output}
        changed = False
        for g in [model.graph, *subgraphs.all_bodies(model)]:
            dead = [node for node in g.node if node.output and all(o in candidates and not reads.get(o) and o not in outputs
                                                                    for o in node.output)]
            for node in dead:
                g.node.remove(node)
                changed = True
            unread = [t for t in g.initializer if t.name in candidates and not reads.get(t.name)
                      and t.name not in outputs and t.name not in {v.name for v in g.input}]
            for tensor in unread:
                g.initializer.remove(tensor)
                changed = True
        if not changed:
            return


def lift_body_weights(model: onnx.ModelProto) -> list[str]:
    """Constant and constant-computed weights of layers inside bodies -> main-graph initializers
    (see the module docstring); returns the new initializers' names."""
    cones = _cones(model)
    if not cones:
        return []
    reads = _read_counts(model)
    defined = _definitions(model)
    shared = _shared_sources(cones, reads)
    taken = set(defined)
    by_value: dict[tuple, str] = {}
    lifted: list[str] = []
    parts: set[str] = set()
    for cone in cones:
        sources = set(cone.leaves) | {node.output[0] for _, node in cone.nodes if node.op_type == "Constant"}
        if sources & shared:
            continue
        value = _evaluate(model, cone)
        if value is None:
            continue
        target = cone.layer.input[cone.index]
        key = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())
        name = by_value.get(key)
        if name is None:
            if cone.single_constant and defined.get(target) == 1:
                name = target              # the Constant's own name; the node goes, every reader keeps it
                owner, node = cone.nodes[0]
                owner.graph.node.remove(node)
            else:
                base = _largest_float_source(cone) or target
                role = "WRB"[cone.index - 1] if cone.layer.op_type in ("LSTM", "GRU", "RNN") else "weight"
                name = graph.fresh_name(f"{base}_{cone.layer.op_type}_{role}", taken)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            by_value[key] = name
            lifted.append(name)
        cone.layer.input[cone.index] = name
        parts |= set(cone.leaves) | {o for _, node in cone.nodes for o in node.output}
    _remove_dead(model, parts - set(lifted))
    return lifted
