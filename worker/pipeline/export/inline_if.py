"""``If`` nodes whose condition is fixed by the input shapes, replaced by the branch they take.

The deploy converters take one sample of fixed shapes (``tflite``, ``pytorch``), and neither
translates ONNX control flow (onnx2tf has no ``If`` of subgraphs; the ONNX-to-PyTorch interpreter
runs a flat node list). Exporters write ``If`` mostly to test a shape: silero-vad's
``if rank == 3: squeeze`` and ``if the state is empty: zeros``. With the shapes fixed such a
condition is a constant, and the model computes exactly its taken branch: that branch's nodes go
into the main graph in place of the ``If`` (its outputs renamed to the ``If``'s), nested ``If``s are
handled the same way once they are in the main graph.

A condition that reads an input's values (not only its shape: silero_vad.onnx's ``sr == 16000``)
is no constant of the shapes: the model is refused with the ``If`` and the inputs named.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from worker.pipeline import graph as graph_mod, subgraphs
from worker.pipeline.graph import fresh_name

SHAPE_READERS = ("Shape", "Size")       # ops whose output depends on their input's shape only
MAX_ROUNDS = 64                          # nesting depth bound (each round inlines one level)


def value_inputs_read(model: onnx.ModelProto, name: str) -> list[str]:
    """The graph inputs whose *values* ``name`` depends on (reading through every node except the
    shape readers, whose outputs depend on their input's shape only); empty when ``name`` is a
    function of the inputs' shapes and the constants."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {v.name for v in model.graph.input if v.name not in inits}
    producers = {out: node for node in model.graph.node for out in node.output if out}
    found, seen, stack = set(), set(), [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in inputs:
            found.add(current)
            continue
        node = producers.get(current)
        if node is None or node.op_type in SHAPE_READERS:
            continue
        stack.extend(n for n in node.input if n)
        stack.extend(subgraphs.outer_reads(node))
    return sorted(found)


def _conditions(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, bool]:
    """The conditions' values for ``feeds``."""
    values = evaluate(model, feeds, names)
    return {name: bool(np.asarray(values[name]).reshape(-1)[0]) for name in names}


def evaluate(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` for ``feeds`` (ONNX Runtime on the model with them as
    its outputs, unoptimized so every name survives)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inits = {t.name for t in model.graph.initializer}
    wanted = {v.name for v in model.graph.input if v.name not in inits}
    values = session.run(names, {key: value for key, value in feeds.items() if key in wanted})
    return dict(zip(names, values))


def _rename_reads(sub: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename the inputs every node of ``sub`` (and its nested subgraphs) reads, and its outputs."""
    graph_mod.rename_node_tensors(sub.node, renames)
    for node in sub.node:
        for attribute in node.attribute:
            for nested in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                _rename_reads(nested, renames)
    for value in sub.output:
        if value.name in renames:
            value.name = renames[value.name]


def _taken_branch(model: onnx.ModelProto, node: onnx.NodeProto, condition: bool, taken: set[str]) -> list[onnx.NodeProto]:
    """The nodes that replace ``node``: the branch's, its names made unique in the main graph, its
    initializers moved to the main graph, then an Identity from each branch output to the If's."""
    branch = onnx.GraphProto()
    branch.CopyFrom(graph_mod.attribute(node, "then_branch" if condition else "else_branch"))
    produced = [t.name for t in branch.initializer] + [out for n in branch.node for out in n.output if out]
    renames = {name: fresh_name(name, taken) for name in produced if name in taken}
    taken.update(produced)
    _rename_reads(branch, renames)
    for tensor in branch.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
        model.graph.initializer.append(tensor)
    nodes = list(branch.node)
    for source, target in zip(branch.output, node.output):
        if target:
            nodes.append(helper.make_node("Identity", [source.name], [target],
                                          name=fresh_name(f"{node.name or target}_taken", taken)))
    return nodes


def inline_constant_ifs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Replace every ``If`` whose condition is fixed by the input shapes with its taken branch, in
    place; ``feeds`` (one sample) give the shapes. Returns how many were inlined; raises
    ``ValueError`` naming the ``If`` and the inputs when a condition reads an input's values."""
    count = 0
    for _ in range(MAX_ROUNDS):
        ifs = [node for node in model.graph.node if node.op_type == "If"]
        if not ifs:
            return count
        for node in ifs:
            reads = value_inputs_read(model, node.input[0])
            if reads:
                raise ValueError(f"If {node.name or node.output[0]!r} branches on the values of input "
                                 f"{', '.join(reads)}, not only on shapes: no single branch to convert")
        values = _conditions(model, feeds, sorted({node.input[0] for node in ifs}))
        taken = {name for n in model.graph.node for name in (*n.input, *n.output)}
        taken |= {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
        keys = {tuple(node.output) for node in ifs}
        rewritten: list[onnx.NodeProto] = []
        for node in model.graph.node:
            if tuple(node.output) in keys and node.op_type == "If":
                rewritten += _taken_branch(model, node, values[node.input[0]], taken)
                count += 1
            else:
                rewritten.append(node)
        del model.graph.node[:]
        model.graph.node.extend(rewritten)
    raise ValueError(f"If nodes nested deeper than {MAX_ROUNDS} levels")
