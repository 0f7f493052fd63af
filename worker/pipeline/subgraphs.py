"""Weights inside If / Loop / Scan bodies: finding them and making them quantizable.

Converted models often keep layers inside control flow (a branch per input size, a decoder step in
a Loop). A body's own initializers are invisible to rewrites of the main graph, so they used to stay
float. ``hoist_weights`` moves them to the main graph under the same name: ONNX lets a body read
outer-scope tensors, the name was already unique model-wide (ONNX's SSA rule covers nested scopes),
so no reader is rewritten and the model computes exactly the same. From there the weight is a main-
graph initializer like any other; ``graph.body_layers`` names the layers inside bodies that consume
such outer-scope weights, so weight-only quantization (a DequantizeLinear in the main graph whose
output keeps the weight's name) covers them too.

The lowest floor of the graph helpers (it imports no other pipeline module): the bodies, and the one
walk over the names read inside them (``outer_reads``, ``inner_reads``, ``subgraph_reads``).
"""
from __future__ import annotations

from typing import Iterator

import onnx

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


def scope_names(g: onnx.GraphProto) -> set[str]:
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
    own = scope_names(body)
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


def _reads(node: onnx.NodeProto, outer_only: bool) -> set[str]:
    """The one walk over what the bodies of ``node`` (at any depth) read (outputs named from outside
    the body count as reads): every name, or with
    ``outer_only`` those defined outside the bodies (by no enclosing body's inputs, initializers or
    nodes)."""
    found: set[str] = set()

    def visit(g: onnx.GraphProto, outer_defined: set[str]) -> None:
        local = outer_defined | scope_names(g) | {t.name for t in g.initializer}
        defined = local if outer_only else outer_defined
        for inner in g.node:
            found.update(name for name in inner.input if name and name not in defined)
            for sub in bodies(inner):
                visit(sub, defined)
        # a body may hand an outer tensor straight back as its output (silero-vad's `else: state`)
        found.update(value.name for value in g.output if value.name and value.name not in local)

    for body in bodies(node):
        visit(body, set())
    return found


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names the bodies of ``node`` (at any depth) read from outside themselves: the node's implicit
    inputs, which must be produced before it runs."""
    return _reads(node, outer_only=True)


def inner_reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node inside the bodies of ``node`` (at any depth) reads."""
    return _reads(node, outer_only=False)


def subgraph_reads(model: onnx.ModelProto, *, outer_only: bool = False) -> set[str]:
    """Names read by nodes inside If / Loop / Scan bodies (at any depth) of the main graph's nodes:
    tensors a rewrite of the main graph must keep, even where no main-graph node reads them
    (``outer_only``: only those the bodies do not define themselves)."""
    return {name for node in model.graph.node for name in _reads(node, outer_only)}
