"""Weights inside If / Loop / Scan bodies: finding them and making them quantizable.

Converted models often keep layers inside control flow (a branch per input size, a decoder step in
a Loop). A body's own initializers are invisible to rewrites of the main graph, so they used to stay
float. ``hoist_weights`` moves them to the main graph under the same name: ONNX lets a body read
outer-scope tensors, the name was already unique model-wide (ONNX's SSA rule covers nested scopes),
so no reader is rewritten and the model computes exactly the same. From there the weight is a main-
graph initializer like any other; ``body_layers`` names the layers inside bodies that consume such
outer-scope weights, so weight-only quantization (a DequantizeLinear in the main graph whose output
keeps the weight's name) covers them too.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import onnx

from worker.pipeline import graph

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def body_nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto, onnx.GraphProto]]:
    """(top-level control-flow node, node inside one of its bodies at any depth, that body)."""
    def visit(top: onnx.NodeProto, g: onnx.GraphProto):
        for inner in g.node:
            yield top, inner, g
            for sub in bodies(inner):
                yield from visit(top, sub)

    for node in model.graph.node:
        for body in bodies(node):
            yield from visit(node, body)


def _scope_names(g: onnx.GraphProto) -> set[str]:
    """Names a body defines itself (its inputs and node outputs): those are not outer-scope reads."""
    return {v.name for v in g.input} | {name for n in g.node for name in n.output}


def all_bodies(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every If / Loop / Scan body of the model, at any depth."""
    def visit(nodes):
        for node in nodes:
            for body in bodies(node):
                yield body
                yield from visit(body.node)

    yield from visit(model.graph.node)


def hoist_weights(model: onnx.ModelProto) -> list[str]:
    """Move float initializers (rank >= 2) of every body, at any depth, to the main graph. A name
    that would collide with a main-graph name, or that the body itself redefines, stays where it is.
    Returns the hoisted names."""
    taken = ({t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
             | {name for n in model.graph.node for name in n.output})
    hoisted: list[str] = []
    for body in list(all_bodies(model)):
        _hoist_from(model, body, taken, hoisted)
    return hoisted


def _hoist_from(model: onnx.ModelProto, body: onnx.GraphProto, taken: set[str], hoisted: list[str]) -> None:
    own = _scope_names(body)
    keep = []
    for tensor in body.initializer:
        if (tensor.data_type in FLOAT_TYPES and len(tensor.dims) >= 2 and tensor.name not in taken
                and tensor.name not in own):
            model.graph.initializer.append(tensor)
            taken.add(tensor.name)
            hoisted.append(tensor.name)
        else:
            keep.append(tensor)
    if len(keep) != len(body.initializer):
        kept = [onnx.TensorProto() for _ in keep]
        for copy, tensor in zip(kept, keep):
            copy.CopyFrom(tensor)
        del body.initializer[:]
        body.initializer.extend(kept)


def body_layers(model: onnx.ModelProto, ops: Sequence[str], seen: set[str], *, include: Sequence[str] = (),
                exclude: Sequence[str] = (), min_params: int = 0) -> list[graph.WeightLayer]:
    """Layers inside bodies whose weight is a main-graph float initializer not in ``seen`` (read from
    the outer scope) or the body's own (before ``hoist_weights`` moved it), filtered like
    ``graph.weight_layers``. Unnamed body nodes are named here (``<control-flow node>/<op>_<n>``)
    so the report and include / exclude can address them."""
    inits = graph.initializers(model)
    names = {n.name for _, n, _ in body_nodes(model) if n.name} | {n.name for n in model.graph.node}
    found: list[graph.WeightLayer] = []
    for top, node, body in body_nodes(model):
        if node.op_type not in ops:
            continue
        own = _scope_names(body)
        local = {t.name: t for t in body.initializer}
        for index, name in enumerate(node.input):
            if name in local and name in inits:     # shadows an outer name: hoisting leaves it in the body
                continue
            tensor = local.get(name, inits.get(name))
            if tensor is None or name in seen or name in own or tensor.data_type not in FLOAT_TYPES:
                continue
            axes = graph._weight_axes(node, index, len(tensor.dims))
            if axes is None:
                continue
            if not node.name:
                node.name = _fresh(f"{top.name or top.op_type}/{node.op_type}", names)
            layer = graph.WeightLayer(name, node.name, node.op_type, tuple(tensor.dims), *axes)
            if layer.params < min_params or not graph.selected(layer, include, exclude):
                continue
            seen.add(name)
            found.append(layer)
    return found


def _fresh(base: str, names: set[str]) -> str:
    for n in range(len(names) + 1):
        candidate = f"{base}_{n}"
        if candidate not in names:
            names.add(candidate)
            return candidate
    raise AssertionError("unreachable")


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names the bodies of ``node`` (at any depth) read from outside themselves: the node's implicit
    inputs, which must be produced before it runs."""
    found: set[str] = set()

    def visit(g: onnx.GraphProto, outer_defined: set[str]) -> None:
        defined = outer_defined | _scope_names(g) | {t.name for t in g.initializer}
        for inner in g.node:
            found.update(name for name in inner.input if name and name not in defined)
            for sub in bodies(inner):
                visit(sub, defined)

    for body in bodies(node):
        visit(body, set())
    return found
