"""Rewrites before static int8 that merge elementwise chains into the layers around them, so that
the Q/DQ pairs sit where ONNX Runtime's integer kernels and its fusions want them. Each leaves the
float outputs unchanged up to float rounding.

- ``fold_channel_affine``: ``Conv -> Mul(c) [-> Add(d)]`` (or ``Conv -> Add(d)``) with per-output-channel
  constants, as paddle2onnx writes a scale / bias after each convolution, becomes one Conv with
  ``W' = c W`` (along the output channels) and ``b' = c b + d``. In a float model ONNX Runtime fuses
  these itself (ConvMulFusion, ConvAddFusion); once the Conv's output has its QuantizeLinear /
  DequantizeLinear pair, the Mul and the Add run in float on every feature map (measured on the
  PP-OCRv4 detector: 28 Mul and 28 Add over 8 x C x 160 x 240 maps), and the output grid is chosen
  for the tensor before the affine, not the one the next layer reads.
- ``fuse_hard_swish``: ``x * Clip(x + 3, 0, 6) / 6`` (the form exporters write, ``/ 6`` or ``* (1/6)``)
  and ``x * HardSigmoid(x; 1/6, 1/2)`` become one ``HardSwish(x)`` (opset 14): one pass over the
  tensor where there were four (on the detector 24 hard-swishes were ~80 ms of its 363 ms static int8
  run, one thread).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import graph, subgraphs

HARD_SWISH_OPSET = 14
_TOLERANCE = 1e-6


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float constants by name: initializers and Constant nodes' values (paddle2onnx writes every
    scale, shift, 3 and 6 as a Constant node)."""
    found = {name: numpy_helper.to_array(tensor) for name, tensor in graph.initializers(model).items()
             if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value" and \
                node.attribute[0].t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _constant(model: onnx.ModelProto, inits: dict, name: str) -> np.ndarray | None:
    value = inits.get(name)
    return None if value is None else value.astype(np.float64)


def _drop_unread(model: onnx.ModelProto, outputs: set[str]) -> None:
    """Initializers and Constant nodes nothing reads any more."""
    used = {name for n in model.graph.node for name in n.input} | subgraphs.subgraph_reads(model) | outputs
    graph.remove_initializers(model, [t.name for t in model.graph.initializer if t.name not in used])
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        model.graph.node.remove(node)


def _per_channel(value: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel of a tensor [N, C, ...] of ``rank`` it broadcasts against,
    or None where it varies along any other axis (or is not a float constant)."""
    if value is None or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy() if shape[1] == channels else \
        np.full(channels, float(value.reshape(-1)[0]))


def _other_input(node: onnx.NodeProto, tensor: str) -> str | None:
    """The input of a binary ``node`` that is not ``tensor`` (None where both are, or neither)."""
    if len(node.input) != 2 or list(node.input).count(tensor) != 1:
        return None
    return node.input[1] if node.input[0] == tensor else node.input[0]


def fold_channel_affine(model: onnx.ModelProto) -> list[str]:
    """Fold per-channel ``Mul`` / ``Add`` constants after a Conv into it (module doc); returns the
    names of the nodes folded away."""
    inits = graph.initializers(model)
    values = _constants(model)
    outputs = {o.name for o in model.graph.output}
    inner = subgraphs.subgraph_reads(model)
    folded: list[str] = []
    for conv in list(model.graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        readers = graph.consumers(model)
        if len(readers.get(conv.input[1], [])) != 1 or conv.input[1] in inner:
            continue          # a weight another layer reads cannot take this layer's factors
        weight = graph.get_array(model, conv.input[1]).astype(np.float64)
        channels, rank = weight.shape[0], weight.ndim
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if has_bias and conv.input[2] not in inits:
            continue
        bias = graph.get_array(model, conv.input[2]).astype(np.float64) if has_bias else np.zeros(channels)
        scale, shift, chain = np.ones(channels), np.zeros(channels), []
        tensor = conv.output[0]
        while tensor not in outputs and tensor not in inner:
            found = readers.get(tensor, [])
            if len(found) != 1 or found[0][0].op_type not in ("Mul", "Add"):
                break
            node = found[0][0]
            other = _other_input(node, tensor)
            value = _per_channel(_constant(model, values, other), rank, channels) if other else None
            if value is None:
                break
            if node.op_type == "Mul":
                scale, shift = scale * value, shift * value
            else:
                shift = shift + value
            chain.append(node)
            tensor = node.output[0]
        if not chain:
            continue
        shape = (-1,) + (1,) * (rank - 1)
        graph.set_array(model, conv.input[1], (weight * scale.reshape(shape)).astype(np.float32))
        bias_name = conv.input[2] if has_bias and len(readers.get(conv.input[2], [])) == 1 and \
            conv.input[2] not in inner else graph.unique_name(model, conv.input[1] + "_bias")
        graph.set_array(model, bias_name, (bias * scale + shift).astype(np.float32))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        conv.output[0] = chain[-1].output[0]
        for node in chain:
            model.graph.node.remove(node)
            folded.append(node.name)
    if folded:
        _drop_unread(model, outputs)
    return folded


def _scalar(model: onnx.ModelProto, inits: dict, name: str) -> float | None:
    value = _constant(model, inits, name) if name else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _is(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= _TOLERANCE * max(1.0, abs(expected))


def _clip_bounds(model: onnx.ModelProto, inits: dict, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    if graph.opset(model) < 11:
        return graph.attribute(node, "min", None), graph.attribute(node, "max", None)
    low = _scalar(model, inits, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = _scalar(model, inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return low, high


def _hard_swishes(model: onnx.ModelProto) -> list[tuple[str, list[onnx.NodeProto]]]:
    """Each hard-swish written out in elementwise ops: (its input x, its nodes, the last writing its
    output), none sharing a node."""
    values = _constants(model)
    outputs = {o.name for o in model.graph.output}
    inner = subgraphs.subgraph_reads(model)
    readers = graph.consumers(model)
    producers = graph.producers(model)

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        if len(found) != 1 or tensor in outputs or tensor in inner:
            return None
        return found[0][0]

    found: list[tuple[str, list[onnx.NodeProto]]] = []
    for mul in model.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for x, gate_name in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            gate = producers.get(gate_name)
            if gate is None or only_reader(gate_name) is not mul:
                continue
            if gate.op_type == "HardSigmoid" and gate.input[0] == x and \
                    _is(graph.attribute(gate, "alpha", 0.2), 1 / 6) and _is(graph.attribute(gate, "beta", 0.5), 0.5):
                found.append((x, [gate, mul]))
                break
            if gate.op_type != "Clip":
                continue
            low, high = _clip_bounds(model, values, gate)
            shift = producers.get(gate.input[0])
            if not (_is(low, 0.0) and _is(high, 6.0)) or shift is None or shift.op_type != "Add" or \
                    only_reader(gate.input[0]) is not gate or _other_input(shift, x) is None or \
                    not _is(_scalar(model, values, _other_input(shift, x)), 3.0):
                continue
            after = only_reader(mul.output[0])
            if after is None or len(after.input) != 2 or after.input[0] != mul.output[0]:
                continue
            divisor = _scalar(model, values, after.input[1])
            if (after.op_type == "Div" and _is(divisor, 6.0)) or (after.op_type == "Mul" and _is(divisor, 1 / 6)):
                found.append((x, [shift, gate, mul, after]))
                break
    return found


def has_hard_swish(model: onnx.ModelProto) -> bool:
    return bool(_hard_swishes(model))


def fuse_hard_swish(model: onnx.ModelProto) -> list[str]:
    """Replace each hard-swish written out in elementwise ops by one ``HardSwish`` (module doc);
    returns the names of the HardSwish nodes made. Below opset 14 (no HardSwish) nothing changes:
    the caller raises the opset first where ``has_hard_swish``."""
    if graph.opset(model) < HARD_SWISH_OPSET:
        return []
    made: list[str] = []
    for x, nodes in _hard_swishes(model):
        end = nodes[-1]
        position = list(model.graph.node).index(nodes[0])
        name = graph.unique_name(model, f"{end.name or end.output[0]}_HardSwish")
        for node in nodes:
            model.graph.node.remove(node)
        model.graph.node.insert(position, helper.make_node("HardSwish", [x], [end.output[0]], name=name))
        made.append(name)
    if made:
        graph.sort_graph(model)
        _drop_unread(model, {o.name for o in model.graph.output})
    return made
