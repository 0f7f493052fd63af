"""Bias correction for static int8: each quantized layer's own expected output shift, removed from
its bias.

For a layer ``y = x W + b`` whose quantized form computes ``y' = x' W' + b`` (``x'`` its input after
QuantizeLinear / DequantizeLinear, ``W'`` its dequantized weight), the shift the layer itself adds
is, by linearity,

    E[y' - y] = E[x'] W' - E[x] W          (both x and x' taken in the quantized model)

so only the per-channel means of each layer's input before and after its Q/DQ pair are needed
(one pass over the calibration data, ending at ``STOP_ROWS`` rows per channel, ``MIN_OBSERVATIONS``
for a pooled tensor of one row per sample, after at least ``MIN_SAMPLES`` samples; bounded memory),
and ``b -= E[y' - y]``. For a Conv the means are per input channel over batch and positions and
the kernel is summed over its window (exact away from the zero-padded border).

Why the layer's own shift and not ``E[y_quantized_model - y_float_model]`` at each layer's output:
that difference also holds every upstream layer's shift, which the upstream layers' own corrections
already remove; subtracting it everywhere in one pass corrects chains several times over. Measured on
a 6-layer BERT sentence encoder: the one-pass output form dropped the task metric from 0.987 (no
correction) to 0.964; this form does not double count.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from worker.pipeline import activations, graph
from worker.pipeline.data import Dataset
from worker.pipeline.step import StepContext

SAMPLES = 512
# A layer whose input mean rests on fewer values per channel than this (an SE block's convs after a
# global pool see one value per sample: 8 on a small calibration set) is left alone: the mean's own
# sampling error is then as large as the shift it would remove. On the PP-OCR orientation classifier
# (8 calibration images) correcting them doubled the output error (rel_l2 0.009 -> 0.019).
MIN_OBSERVATIONS = 64
# The pass stops once every corrected layer's input has this many rows (tokens, pixels) per channel,
# before and after its Q/DQ pair. The shift is a paired difference on the same rows: E[x'] - E[x] is
# the mean of the rounding (and clipping) error, whose spread is ~scale / sqrt(12), so at 1024 rows
# its sampling error is ~0.009 of one quantization step, far below the shifts worth removing (a
# channel's systematic rounding, up to half a step). A BERT sees 104 rows per 104-token sentence:
# 10 sentences, not all 128 of a calibration set. It was 4096 (40 sentences); at 1024 the real
# models' static int8 task metrics held (bench.real_bench: MiniLM's rel_l2 0.0488 -> 0.0483, the
# others unchanged).
# A sample carrying few rows per channel (a VAD's audio chunk, an MLP's one row) still reads up to
# SAMPLES, except a pooled tensor (one row per sample where other layers see many: an SE block's
# after a global pool), done at MIN_OBSERVATIONS: it can hardly reach STOP_ROWS, and waiting for it
# ran every SE network's pass over all its calibration data (the PP-OCR recognizer's 128 lines, half
# of its static int8 job) for a mean whose sampling error at 64 rows is already ~0.04 of a step.
STOP_ROWS = 1024
# ... and never before this many samples: rows of one sample are not independent draws (a detector's
# 120 x 120 map fills STOP_ROWS from one image, whose content sets every pixel's rounding). Measured
# on the PP-OCRv4 detector (16 distinct images, SE layers held out of the stop): output rel_l2 0.135
# after 1 image, 0.124 after 8, 0.1047 after 16 and after all 64 that its SE layers read.
MIN_SAMPLES = 16


class Rider(Protocol):
    """Another measurement on the quantized model's layer inputs that this pass feeds as it goes
    (``pair_saturation.Sampler``), so both take one pass; ``finish`` runs after the pass and before
    the shifts are computed, and may change weights (the shifts then read the weights it leaves)."""

    tensors: list[str]

    def add(self, count: int, values: dict[str, np.ndarray]) -> None: ...

    def done(self) -> bool: ...

    def finish(self) -> None: ...


def _dequantized_weight(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The float value the quantized model's DequantizeLinear produces under ``name``."""
    inits = graph.initializers(model)
    node = graph.producers(model).get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float64) if name in inits else None
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in inits else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:
        axis = graph.attribute(node, "axis", 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _pre_quantization(model: onnx.ModelProto, tensor: str) -> str:
    """The float tensor in front of the Q/DQ pair that produced ``tensor`` (itself when none)."""
    producers = graph.producers(model)
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return tensor
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


def _output_mean(node: onnx.NodeProto, weight: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[y] (without bias) per output channel of ``node`` for inputs whose per-channel mean is ``mean``."""
    if node.op_type == "MatMul" and weight.ndim == 2 and mean.shape[0] == weight.shape[0]:
        return mean @ weight
    if node.op_type == "Gemm" and weight.ndim == 2:
        matrix = weight.T if graph.attribute(node, "transB", 0) else weight
        if graph.attribute(node, "transA", 0) or mean.shape[0] != matrix.shape[0]:
            return None
        return graph.attribute(node, "alpha", 1.0) * (mean @ matrix)
    if node.op_type == "Conv" and weight.ndim >= 3:
        groups = graph.attribute(node, "group", 1)
        per_group_in = weight.shape[1]
        if mean.shape[0] != per_group_in * groups:
            return None
        window = weight.reshape(weight.shape[0], per_group_in, -1).sum(axis=2)   # [O, C/g]
        per_group_out = weight.shape[0] // groups
        channels = (np.arange(weight.shape[0]) // per_group_out)[:, None] * per_group_in + np.arange(per_group_in)
        return (window * mean[channels]).sum(axis=1)
    return None


def correct(float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: list[onnx.NodeProto],
            weight_of: dict[str, str], data: Dataset, ctx: StepContext, relu_folded: set[str] = frozenset(), *,
            bias_input: Callable[..., tuple[str | None, int]], rider: Rider | None = None) -> list[str]:
    """Remove each layer's own mean output shift from its bias (a Conv or Gemm without one gets one;
    a MatMul needs its bias Add). ``relu_folded``: tensors whose Q/DQ pair replaced a ReLU (the float
    value the layer would read is ``max(x, 0)``). ``bias_input(model, node, readers)``: (the bias
    initializer the node's output adds or None, its channel axis) — static's, which imports this
    module. ``rider``: fed by the same pass (see ``Rider``); left alone when there is no layer to
    correct. Returns the corrected node names."""

    by_name = {node.name: node for node in quantized.graph.node}
    # who reads what, once: correcting a layer changes a bias's values, or gives a Conv / Gemm a
    # bias of a new name only that layer reads, so the table holds for every other layer's question
    # (rebuilt for each layer, twice, it was a tenth of a BERT's static int8 job)
    readers = graph.consumers(quantized)
    targets = []
    for node in nodes:
        live = by_name.get(node.name)
        if live is None or node.name not in weight_of or live.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        if live.op_type == "MatMul" and bias_input(quantized, live, readers)[0] is None:
            continue
        if live.op_type == "Gemm" and graph.attribute(live, "beta", 1.0) != 1.0:
            continue
        targets.append((live, live.input[0], _pre_quantization(quantized, live.input[0])))
    if not targets:
        return []
    corrected_inputs = {name for _, after, before in targets for name in (after, before)}
    names = sorted(corrected_inputs | set(rider.tensors if rider is not None else ()))
    channel_axis = {after: (1 if node.op_type == "Conv" else -1) for node, after, _ in targets}
    channel_axis.update({before: channel_axis[after] for _, after, before in targets})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = 0
    for seen, batch in activations.capture_counted(quantized, data, names, batch_size=16,
                                                   limit=min(data.size, SAMPLES)):
        samples += seen
        if rider is not None:
            rider.add(seen, batch)
        for name, value in batch.items():
            if name not in corrected_inputs:
                continue
            if name in relu_folded:
                value = np.maximum(value, 0)
            # summed in float64 over every axis but the channel's, without a float64 copy of the
            # activation nor a channel-last copy (moving a Conv's NCHW channels last first was a
            # quarter of the PP-OCR recognizer's pass)
            axis = channel_axis[name] % value.ndim
            others = tuple(i for i in range(value.ndim) if i != axis)
            sums[name] = sums.get(name, 0.0) + value.sum(axis=others, dtype=np.float64)
            counts[name] = counts.get(name, 0) + value.size // max(value.shape[axis], 1)
        ctx.check_cancelled()
        pooling = any(counts.get(name, 0) > samples for name in corrected_inputs)
        if (samples >= MIN_SAMPLES and all(_enough(counts.get(name, 0), samples, pooling) for name in corrected_inputs)
                and (rider is None or rider.done())):
            break
    if rider is not None:
        rider.finish()
    corrected = []
    for node, after, before in targets:
        if counts.get(after, 0) < MIN_OBSERVATIONS or counts.get(before, 0) < MIN_OBSERVATIONS:
            continue
        float_weight = graph.get_array(float_model, weight_of[node.name]).astype(np.float64)
        quant_weight = _dequantized_weight(quantized, weight_of[node.name])
        if quant_weight is None or quant_weight.shape != float_weight.shape:
            continue
        y_quant = _output_mean(node, quant_weight, sums[after] / counts[after])
        y_float = _output_mean(node, float_weight, sums[before] / counts[before])
        if y_quant is None or y_float is None:
            continue
        if _apply(quantized, node, (y_quant - y_float).astype(np.float32), bias_input, readers):
            corrected.append(node.name)
    return corrected


def _enough(rows: int, samples: int, pooling: bool) -> bool:
    """Whether a tensor that showed ``rows`` rows per channel over ``samples`` samples needs no more.
    ``pooling``: some layer sees more than one row per sample, so a one-row tensor is a pooled one
    (in a model of one row per sample everywhere, an MLP, a sample is cheap: each reads STOP_ROWS)."""
    return rows >= STOP_ROWS or (pooling and rows <= samples and rows >= MIN_OBSERVATIONS)


def _apply(model: onnx.ModelProto, node: onnx.NodeProto, shift: np.ndarray, bias_input, readers) -> bool:
    bias_name, _ = bias_input(model, node, readers)
    if bias_name is None:
        if node.op_type == "MatMul" or (len(node.input) > 2 and node.input[2]):
            return False      # no bias to shift, or one that is no per-channel initializer
        bias_name = graph.unique_name(model, f"{node.name}_bias")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = bias_name
        graph.set_array(model, bias_name, -shift)
        return True
    if len(readers.get(bias_name, [])) != 1:
        return False          # a bias another layer reads too cannot take this layer's shift
    bias = graph.get_array(model, bias_name).astype(np.float32)
    if bias.shape != shift.shape:
        return False
    graph.set_array(model, bias_name, bias - shift)
    return True
