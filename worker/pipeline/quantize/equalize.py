"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization") of Conv -> Conv chains
before static int8, exact in float, and high-bias absorption after it.

For ``y = conv2(f(conv1(x)))`` with ``f`` the identity or ReLU (positively homogeneous:
``f(x / s) = f(x) / s`` for ``s > 0``) and per channel ``i`` of conv1's output:

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i,    s_i = sqrt(r1_i * r2_i) / r2_i

with ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``; afterwards both ranges equal
``sqrt(r1_i r2_i)``. A depthwise conv1 (one filter per channel) often has filters of very different
ranges that one per-channel grid handles, but the *activations* it produces then differ per channel
too, which one per-tensor activation grid cannot; equalizing evens them out. Grouped and depthwise
conv2 are handled by mapping channel ``i`` to its group's filters.

Only exact cases are rewritten: conv1's output (or the activation's) read by conv2 alone, weights
read by one layer, no graph output in between. With calibration ranges (``channel_ranges``: each
conv1 output channel's min / max on the calibration data), a ReLU6-style ``Clip(0, m)`` is passed
too where it is exact on that data: ``clip(y / s, 0, m) s = clip(y, 0, m s)`` equals ``clip(y, 0, m)``
for every value seen iff ``max y <= m min(1, s)``; a channel that fails keeps ``s_i = 1``.

Hard-swish is not done: ``s hswish(y / s) != hswish(y)`` for every ``s != 1`` wherever ``-3 < y < 3``
(its quadratic part), so every scaled channel changes the float model. In the exported MobileNetV3
detector the bench uses (PP-OCRv4, paddle2onnx) it would not apply anyway: each Conv is followed by a
scalar affine (``Mul``, ``Add`` by one learned number: PP-LCNetV3's learnable affine blocks), then
the decomposed hard-swish, then another scalar affine, and ``a y / s + b != (a y + b) / s`` for
``b != 0``: the pairs it has are the stem (Conv -> depthwise Conv, no activation) and Conv -> ReLU ->
Conv chains (squeeze-excite blocks, the FPN), once the Conv biases paddle2onnx writes as Constant
nodes are initializers (``lift_constants.lift_biases``, done first).

High-bias absorption (``absorb_high_bias``, same paper, section 4.2, with the calibration minimum in
place of the BatchNorm bound ``beta - 3 gamma``): where channel ``i`` of conv1's output stays in
``f``'s linear range over the calibration data (``c_i = min y_i > 0``, and ``max y_i <= m`` for a
Clip), ``f(y_i) = f(y_i - c_i) + c_i`` there, so ``b1[i] -= c_i`` and conv2's bias takes
``+ sum over its window of W2[:, i] c_i``. Exact on the data seen when conv2 has no padding (with
padding, border outputs would read zeros where the constant ``c_i`` was folded in, so such pairs
are skipped). The activation after conv1 then starts at 0 instead of ``min c_i``: its per-tensor
grid spends no steps on values it never takes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from worker.pipeline import activations, graph
from worker.pipeline.data import Dataset
from worker.pipeline.quantize.bias_correction import MIN_OBSERVATIONS, _output_mean

ITERATIONS = 3          # chains equalize in turn; a few sweeps let neighbouring pairs settle
FACTOR_RANGE = (1e-2, 1e2)
SAMPLES = 256           # calibration samples the channel ranges are taken on


@dataclass(frozen=True)
class Pair:
    conv1: onnx.NodeProto
    activation: onnx.NodeProto | None      # Relu, Clip(0, m) or None (conv1 feeds conv2 directly)
    upper: float                           # m for a Clip, inf otherwise
    conv2: onnx.NodeProto


@dataclass
class ChannelRange:
    """Per output channel of conv1, its min and max on the calibration data (kept current as the
    pair is rescaled and absorbed) and how many values each rests on."""

    lo: np.ndarray
    hi: np.ndarray
    count: int


def _constant(model: onnx.ModelProto, name: str) -> float | None:
    """A scalar from an initializer or a Constant node, None when it is neither."""
    if not name:
        return None
    inits = graph.initializers(model)
    if name in inits:
        value = graph.get_array(model, name)
    else:
        node = graph.producers(model).get(name)
        if node is None or node.op_type != "Constant" or not node.attribute:
            return None
        value = np.asarray(onnx.numpy_helper.to_array(node.attribute[0].t)) if node.attribute[0].type == \
            onnx.AttributeProto.TENSOR else None
    return float(np.asarray(value).reshape(-1)[0]) if value is not None and np.asarray(value).size == 1 else None


def _clip_upper(model: onnx.ModelProto, node: onnx.NodeProto) -> float | None:
    """m for a ``Clip(0, m)`` (inputs from opset 11, attributes before), None for any other Clip."""
    if len(node.input) > 1 or graph.attribute(node, "min") is None:
        lo = _constant(model, node.input[1]) if len(node.input) > 1 else None
        hi = _constant(model, node.input[2]) if len(node.input) > 2 else None
    else:
        lo, hi = graph.attribute(node, "min"), graph.attribute(node, "max")
    return float(hi) if lo == 0.0 and hi is not None and hi > 0 else None


def pairs(model: onnx.ModelProto, bounded: bool = False) -> list[Pair]:
    """Conv -> [Relu | Clip(0, m) (``bounded`` only) ->] Conv chains that can be rewritten."""
    inits = graph.initializers(model)
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    found = []
    for conv1 in model.graph.node:
        if conv1.op_type != "Conv" or conv1.input[1] not in inits or len(readers.get(conv1.input[1], [])) != 1:
            continue
        tensor = conv1.output[0]
        nxt = readers.get(tensor, [])
        if tensor in outputs or len(nxt) != 1:
            continue
        node, index = nxt[0]
        activation, upper = None, float("inf")
        if node.op_type == "Relu" or (bounded and node.op_type == "Clip"):
            if node.op_type == "Clip":
                upper = _clip_upper(model, node)
                if upper is None:
                    continue
            activation = node
            tensor = node.output[0]
            nxt = readers.get(tensor, [])
            if tensor in outputs or len(nxt) != 1:
                continue
            node, index = nxt[0]
        if node.op_type != "Conv" or index != 0 or node.input[1] not in inits or \
                len(readers.get(node.input[1], [])) != 1:
            continue
        if len(conv1.input) > 2 and conv1.input[2] and (conv1.input[2] not in inits or
                                                        len(readers.get(conv1.input[2], [])) != 1):
            continue
        found.append(Pair(conv1, activation, upper, node))
    return found


def channel_ranges(model: onnx.ModelProto, data: Dataset, check_cancelled=lambda: None) -> dict[str, ChannelRange]:
    """conv1 output -> its per-channel min / max over the calibration data, for every pair (bounded
    ones included), in one pass."""
    names = sorted({pair.conv1.output[0] for pair in pairs(model, bounded=True)})
    if not names:
        return {}
    found: dict[str, ChannelRange] = {}
    for batch in activations.capture(model, data, names, batch_size=16, limit=min(data.size, SAMPLES)):
        for name, value in batch.items():
            if value.ndim < 2:
                continue
            flat = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]).astype(np.float64)
            lo, hi = flat.min(axis=0), flat.max(axis=0)
            if name in found:
                known = found[name]
                known.lo, known.hi = np.minimum(known.lo, lo), np.maximum(known.hi, hi)
                known.count += flat.shape[0]
            else:
                found[name] = ChannelRange(lo, hi, flat.shape[0])
        check_cancelled()
    return found


def _input_ranges(w2: np.ndarray, groups: int, channels: int) -> np.ndarray | None:
    """max |W2[:, i]| for each input channel i of a (grouped) conv2."""
    per_group_in = w2.shape[1]
    if per_group_in * groups != channels or w2.shape[0] % groups:
        return None
    per_group_out = w2.shape[0] // groups
    absolute = np.abs(w2).reshape(groups, per_group_out, per_group_in, -1)
    return absolute.max(axis=(1, 3)).reshape(-1)


def equalize(model: onnx.ModelProto, ranges: dict[str, ChannelRange] | None = None) -> list[str]:
    """Equalize every exact Conv -> [ReLU ->] Conv pair in place, and with ``ranges`` (from
    ``channel_ranges``, kept current here) the Clip(0, m) pairs where exact on the data; returns the
    conv1 names."""
    done: list[str] = []
    for _ in range(ITERATIONS):
        for pair in pairs(model, bounded=ranges is not None):
            conv1, conv2 = pair.conv1, pair.conv2
            seen = ranges.get(conv1.output[0]) if ranges is not None else None
            if pair.activation is not None and pair.activation.op_type == "Clip" and seen is None:
                continue
            w1 = graph.get_array(model, conv1.input[1]).astype(np.float64)
            w2 = graph.get_array(model, conv2.input[1]).astype(np.float64)
            groups = graph.attribute(conv2, "group", 1)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = _input_ranges(w2, groups, w1.shape[0])
            if r2 is None or (seen is not None and seen.lo.shape != r1.shape):
                continue
            s = np.ones_like(r1)
            live = (r1 > 0) & (r2 > 0)
            s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
            s = np.clip(s, *FACTOR_RANGE)
            if np.isfinite(pair.upper):
                # clip(y / s, 0, m) s == clip(y, 0, m) on every value seen iff max y <= m min(1, s)
                s = np.where(seen.hi <= pair.upper * np.minimum(1.0, s), s, 1.0)
            if np.all(s == 1.0):
                continue
            graph.set_array(model, conv1.input[1], (w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(np.float32))
            if len(conv1.input) > 2 and conv1.input[2]:
                bias = graph.get_array(model, conv1.input[2]).astype(np.float64)
                graph.set_array(model, conv1.input[2], (bias / s).astype(np.float32))
            per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
            factor = s.reshape(groups, 1, per_group_in, 1)
            shaped = w2.reshape(groups, per_group_out, per_group_in, -1) * factor
            graph.set_array(model, conv2.input[1], shaped.reshape(w2.shape).astype(np.float32))
            if seen is not None:
                seen.lo, seen.hi = seen.lo / s, seen.hi / s
            if conv1.name not in done:
                done.append(conv1.name)
    return done


def _unpadded(node: onnx.NodeProto) -> bool:
    auto_pad = graph.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad == "VALID" or (auto_pad == "NOTSET" and not any(graph.attribute(node, "pads", []) or []))


def absorb_high_bias(model: onnx.ModelProto, ranges: dict[str, ChannelRange]) -> list[str]:
    """High-bias absorption (module docstring) for every Conv -> Relu / Clip(0, m) -> Conv pair whose
    conv2 has no padding, in place; ``ranges`` kept current. Returns the conv1 names absorbed."""
    done = []
    for pair in pairs(model, bounded=True):
        conv1, conv2 = pair.conv1, pair.conv2
        seen = ranges.get(conv1.output[0])
        if pair.activation is None or seen is None or seen.count < MIN_OBSERVATIONS or not _unpadded(conv2):
            continue
        if len(conv1.input) < 3 or not conv1.input[2]:
            continue              # no bias to take the shift from
        linear = (seen.lo > 0) & (seen.hi <= pair.upper)
        shift = np.where(linear, seen.lo, 0.0)
        if not np.any(shift > 0):
            continue
        w2 = graph.get_array(model, conv2.input[1]).astype(np.float64)
        moved = _output_mean(conv2, w2, shift)
        if moved is None:
            continue
        readers = graph.consumers(model)
        if len(conv2.input) > 2 and conv2.input[2]:
            if conv2.input[2] not in graph.initializers(model) or len(readers.get(conv2.input[2], [])) != 1:
                continue
            bias2 = graph.get_array(model, conv2.input[2]).astype(np.float64)
            name2 = conv2.input[2]
        else:
            bias2, name2 = np.zeros(w2.shape[0]), graph.unique_name(model, f"{conv2.name}_bias")
            while len(conv2.input) < 3:
                conv2.input.append("")
            conv2.input[2] = name2
        bias1 = graph.get_array(model, conv1.input[2]).astype(np.float64)
        graph.set_array(model, conv1.input[2], (bias1 - shift).astype(np.float32))
        graph.set_array(model, name2, (bias2 + moved).astype(np.float32))
        seen.lo, seen.hi = seen.lo - shift, seen.hi - shift
        done.append(conv1.name)
    return done
