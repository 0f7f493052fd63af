"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization") of Conv -> Conv chains
before static int8, exact in float.

For ``y = conv2(f(conv1(x)))`` with ``f`` the identity or ReLU (positively homogeneous:
``f(x / s) = f(x) / s`` for ``s > 0``) and per channel ``i`` of conv1's output:

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i,    s_i = sqrt(r1_i * r2_i) / r2_i

with ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``; afterwards both ranges equal
``sqrt(r1_i r2_i)``. A depthwise conv1 (one filter per channel) often has filters of very different
ranges that one per-channel grid handles, but the *activations* it produces then differ per channel
too, which one per-tensor activation grid cannot; equalizing evens them out. Grouped and depthwise
conv2 are handled by mapping channel ``i`` to its group's filters.

Only exact cases are rewritten: conv1's output (or the ReLU's) read by conv2 alone, weights read by
one layer, no graph output in between. Bounded activations (ReLU6 / Clip, hard-swish) are left
alone: scaling a channel moves its clip point.
"""
from __future__ import annotations

import numpy as np
import onnx

from worker.pipeline import graph

ITERATIONS = 3          # chains equalize in turn; a few sweeps let neighbouring pairs settle
FACTOR_RANGE = (1e-2, 1e2)


def _pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
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
        if node.op_type == "Relu":
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
        found.append((conv1, node))
    return found


def _input_ranges(w2: np.ndarray, groups: int, channels: int) -> np.ndarray | None:
    """max |W2[:, i]| for each input channel i of a (grouped) conv2."""
    per_group_in = w2.shape[1]
    if per_group_in * groups != channels or w2.shape[0] % groups:
        return None
    per_group_out = w2.shape[0] // groups
    absolute = np.abs(w2).reshape(groups, per_group_out, per_group_in, -1)
    return absolute.max(axis=(1, 3)).reshape(-1)


def equalize(model: onnx.ModelProto) -> list[str]:
    """Equalize every exact Conv -> [ReLU ->] Conv pair in place; returns the conv1 names."""
    done: list[str] = []
    for _ in range(ITERATIONS):
        for conv1, conv2 in _pairs(model):
            w1 = graph.get_array(model, conv1.input[1]).astype(np.float64)
            w2 = graph.get_array(model, conv2.input[1]).astype(np.float64)
            groups = graph.attribute(conv2, "group", 1)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = _input_ranges(w2, groups, w1.shape[0])
            if r2 is None:
                continue
            s = np.ones_like(r1)
            live = (r1 > 0) & (r2 > 0)
            s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
            s = np.clip(s, *FACTOR_RANGE)
            graph.set_array(model, conv1.input[1], (w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(np.float32))
            if len(conv1.input) > 2 and conv1.input[2]:
                bias = graph.get_array(model, conv1.input[2]).astype(np.float64)
                graph.set_array(model, conv1.input[2], (bias / s).astype(np.float32))
            per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
            factor = s.reshape(groups, 1, per_group_in, 1)
            shaped = w2.reshape(groups, per_group_out, per_group_in, -1) * factor
            graph.set_array(model, conv2.input[1], shaped.reshape(w2.shape).astype(np.float32))
            if conv1.name not in done:
                done.append(conv1.name)
    return done
