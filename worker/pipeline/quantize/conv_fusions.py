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
- ``fold_input_affine``: the same constants in front of Convs (``act -> Mul(c) [-> Add(d)] -> Conv``,
  PP-LCNet's learnable affine after each activation) folded into the Convs' input channels.
- ``fuse_hard_swish``: ``x * Clip(x + 3, 0, 6) / 6`` (the form exporters write, ``/ 6`` or ``* (1/6)``)
  and ``x * HardSigmoid(x; 1/6, 1/2)`` become one ``HardSwish(x)`` (opset 14): one pass over the
  tensor where there were four (on the detector 24 hard-swishes were ~80 ms of its 363 ms static int8
  run, one thread).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import graph, shape_inference, subgraphs

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


def _constant(values: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    value = values.get(name)
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
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits or \
                inits[conv.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue          # a float16 model's weights stay as they are
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
            value = _per_channel(_constant(values, other), rank, channels) if other else None
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


def _scalar(values: dict[str, np.ndarray], name: str) -> float | None:
    value = _constant(values, name) if name else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _is(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= _TOLERANCE * max(1.0, abs(expected))


def _clip_bounds(model: onnx.ModelProto, inits: dict, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    if graph.opset(model) < 11:
        return graph.attribute(node, "min", None), graph.attribute(node, "max", None)
    low = _scalar(inits, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = _scalar(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
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
                    not _is(_scalar(values, _other_input(shift, x)), 3.0):
                continue
            after = only_reader(mul.output[0])
            if after is None or len(after.input) != 2 or after.input[0] != mul.output[0]:
                continue
            divisor = _scalar(values, after.input[1])
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


def _unpadded(conv: onnx.NodeProto) -> bool:
    auto_pad = graph.attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(graph.attribute(conv, "pads", [])))


def _input_channel_of(weight: np.ndarray, groups: int, channels_in: int) -> np.ndarray | None:
    """For W [O, I / groups, k...]: the input channel each (o, j) reads, [O, I / groups]."""
    outputs, per_group = weight.shape[0], weight.shape[1]
    if groups < 1 or outputs % groups or per_group * groups != channels_in:
        return None
    group_of = np.arange(outputs) // (outputs // groups)
    return group_of[:, None] * per_group + np.arange(per_group)[None, :]


def fold_input_affine(model: onnx.ModelProto) -> list[str]:
    """A per-channel ``Mul(c)`` [then ``Add(d)``] whose result only Convs read (PP-LCNet's learnable
    affine after each activation) folded into those Convs: ``W'[o, j] = c[i] W[o, j]`` for the input
    channel ``i`` that (o, j) reads, exact whatever the padding (a padded zero stays zero when scaled);
    ``d`` goes into the bias, ``b' = b + sum W[o, j, ..] d[i]``, where no reader pads (at a padded border
    the Conv would see ``d`` where it saw 0); otherwise ``Add(d / c)`` stays in front of the Convs.
    Returns the names of the nodes folded away."""
    inits = graph.initializers(model)
    values = _constants(model)
    outputs = {o.name for o in model.graph.output}
    inner = subgraphs.subgraph_reads(model)
    folded: list[str] = []
    if not any(node.op_type == "Mul" for node in model.graph.node):
        return folded
    # the Convs will read the Mul's input: its rank must be theirs (a constant may broadcast it up)
    ranks = {name: len(shape) for name, shape in shape_inference.inferred_shapes(model).items()}
    for mul in list(model.graph.node):
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        readers = graph.consumers(model)
        for source in mul.input:
            other = _other_input(mul, source)
            if other is None or other not in values or source in values or ranks.get(source) is None \
                    or ranks.get(source) != ranks.get(mul.output[0]):
                continue
            chain, tensor = [mul], mul.output[0]
            after = readers.get(tensor, [])
            shift_name = _other_input(after[0][0], tensor) if len(after) == 1 and after[0][0].op_type == "Add" else None
            if shift_name is not None and shift_name in values and tensor not in outputs and tensor not in inner:
                chain.append(after[0][0])
                tensor = after[0][0].output[0]
            convs = readers.get(tensor, [])
            if not convs or tensor in outputs or tensor in inner or any(
                    node.op_type != "Conv" or index != 0 or len(node.input) < 2 or node.input[1] not in inits
                    or inits[node.input[1]].data_type != onnx.TensorProto.FLOAT
                    or len(readers.get(node.input[1], [])) != 1 or node.input[1] in inner
                    or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits) for node, index in convs):
                break
            weights = [graph.get_array(model, node.input[1]).astype(np.float64) for node, _ in convs]
            channels_in = weights[0].shape[1] * graph.attribute(convs[0][0], "group", 1)
            rank = weights[0].ndim
            scale = _per_channel(values[other].astype(np.float64), rank, channels_in)
            shift = _per_channel(values[shift_name].astype(np.float64), rank, channels_in) if len(chain) == 2 else \
                np.zeros(channels_in)
            maps = [_input_channel_of(w, graph.attribute(node, "group", 1), channels_in)
                    for w, (node, _) in zip(weights, convs)]
            if scale is None or shift is None or any(m is None for m in maps) or not np.all(scale != 0):
                break
            into_bias = all(_unpadded(node) for node, _ in convs)
            if len(chain) == 1 and not into_bias:
                into_bias = True          # nothing to add: the scale alone folds exactly
            for (node, _), weight, index in zip(convs, weights, maps):
                expand = (slice(None), slice(None)) + (None,) * (rank - 2)
                scaled = weight * scale[index][expand]
                graph.set_array(model, node.input[1], scaled.astype(np.float32))
                if into_bias and np.any(shift):
                    has_bias = len(node.input) > 2 and bool(node.input[2])
                    bias = graph.get_array(model, node.input[2]).astype(np.float64) if has_bias else \
                        np.zeros(weight.shape[0])
                    added = (weight * shift[index][expand]).reshape(weight.shape[0], -1).sum(axis=1)
                    name = node.input[2] if has_bias and len(readers.get(node.input[2], [])) == 1 \
                        else graph.unique_name(model, node.input[1] + "_bias")
                    graph.set_array(model, name, (bias + added).astype(np.float32))
                    while len(node.input) < 3:
                        node.input.append("")
                    node.input[2] = name
            if into_bias:
                for node, index in convs:
                    node.input[index] = source
                for node in chain:
                    model.graph.node.remove(node)
                    folded.append(node.name)
            else:
                # the shift stays, divided by the scale now inside the Convs: Add(x, d / c)
                add = chain[1]
                shift_tensor = graph.unique_name(model, add.name + "_shift")
                graph.set_array(model, shift_tensor, (shift / scale).reshape([-1] + [1] * (rank - 2)).astype(np.float32))
                add.input[:] = [source, shift_tensor]
                model.graph.node.remove(mul)
                folded.append(mul.name)
            break
    if folded:
        _drop_unread(model, outputs)
    return folded
