"""Weight-only DequantizeLinear in the form ONNX Runtime runs fastest on the target.

ONNX Runtime keeps DequantizeLinear out of constant folding (its QDQ fusions must see it), so a
weight-only layer's weight is dequantized on every run, and the layer no longer reads a constant
weight: the CPU provider can then neither pre-pack it nor move a Conv to its blocked (NCHWc) layout.
On the digits CNN that costs 1.82 ms against the float model's 1.13 ms. The same integers, scales
and zero points written as

    Cast(q -> float) [- Cast(zero point)] * scale        (scale shaped to broadcast along the axis)

compute the same values ((q - z) * s in float32) and are folded once when the session loads: the
layer runs on a constant float weight at the float model's speed, while the file keeps its integers.
A per-axis scale that only its DequantizeLinear read is stored already shaped [1, .., C, .., 1] (the same
values, new dims) rather than reshaped by a node: a Reshape and its shape tensor per weight were
~3 KB of silero-vad's int8 file and ~2.4 KB of the PP-OCR classifier's.
The price is memory at run time (the float weight, as in the original model).

``choose_form`` measures the model both ways on the target (whole model, interleaved runs, one batch
of the data the report uses) and keeps the folded form unless DequantizeLinear is measurably faster.
Where ONNX Runtime's CPU graph fuses none of the weight-only DequantizeLinear nodes into a kernel
(its optimized graph still holds each one), the folded form is taken without timing: it does the
same work less a dequantization per run (``UNFUSED``, in the step row's ``reason``).
Folded is the default because it runs the original's own float layers (pre-packed): on one sample
the two forms often measure within noise, while on a batch of 32 DequantizeLinear cost the bench
transformer's int4 model 1.25x the folded form's time (9.5 against 7.5 ms). It runs
once on the recipe's final model (``finalize``), so that steps after ``quantize`` (``distill``) still see
DequantizeLinear and its grid. Left alone: pairs that static int8 fuses into integer kernels (a
reader whose activation comes from a DequantizeLinear), sub-byte types Cast cannot read at the
model's opset, and recipes that asked for ``format: qdq``.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.pipeline import graph, metrics, sessions, subgraphs

# the integer types Cast reads, and the opset from which it does
CAST_OPSET = {TensorProto.INT8: 13, TensorProto.UINT8: 13, TensorProto.INT4: 21, TensorProto.UINT4: 21,
              TensorProto.INT2: 25, TensorProto.UINT2: 25}
FASTER_BY = 0.97       # DequantizeLinear must beat the folded form by 3% to be kept


def weight_only_dequantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes of the main graph that dequantize a stored weight for float layers."""
    inits = graph.initializers(model)
    producers = graph.producers(model)
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    version = graph.opset(model)
    read_by_bodies = subgraphs.subgraph_reads(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        names = [name for name in node.input if name]
        if not all(name in inits for name in names):
            continue
        if CAST_OPSET.get(inits[node.input[0]].data_type, 10**6) > version or node.output[0] in outputs:
            continue
        # a weight read inside an If / Loop / Scan body (hoisted there: an LSTM in a branch) is
        # weight-only by construction; folded in the main graph, the body reads a constant
        # (silero-vad 16k+8k static int8: 1.29 ms -> 0.79 ms per chunk, 1 thread)
        fused = any(producers.get(other) is not None and producers[other].op_type == "DequantizeLinear"
                    for reader, _ in readers.get(node.output[0], []) for other in reader.input
                    if other and other != node.output[0])
        if not fused and (readers.get(node.output[0]) or node.output[0] in read_by_bodies):
            found.append(node)
    return found


@dataclass
class Folded:
    """What ``fold`` changed, so that ``unfold`` can put the DequantizeLinear form back."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)      # the graph's nodes before
    added: list[str] = field(default_factory=list)                 # initializers added
    dropped: list[onnx.TensorProto] = field(default_factory=list)  # initializers only they read
    reshaped: dict[str, onnx.TensorProto] = field(default_factory=dict)  # scales stored shaped: as they were
    own_scales: set[str] = field(default_factory=set)              # scales only their DequantizeLinear reads
    weights: list[str] = field(default_factory=list)


def fold(model: onnx.ModelProto, dequantizers: list[onnx.NodeProto]) -> Folded:
    """Rewrite each DequantizeLinear as Cast [- Cast(z)] * scale, in place (see the module doc)."""
    done = Folded(nodes=[_copy(n) for n in model.graph.node])
    inits = graph.initializers(model)
    targets = {node.output[0] for node in dequantizers}
    reads = Counter(name for n in model.graph.node for name in n.input)
    pinned = subgraphs.subgraph_reads(model) | {value.name for value in model.graph.output} \
        | {value.name for value in model.graph.input}
    # scales read by their DequantizeLinear alone: free to store in the shape the Mul broadcasts
    done.own_scales = {n.input[1] for n in dequantizers if reads[n.input[1]] == 1 and n.input[1] not in pinned}
    rewritten: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in targets:
            rewritten.append(_copy(node))
            continue
        weight = node.output[0]
        q = inits[node.input[0]]
        float_type = inits[node.input[1]].data_type
        value = graph.unique_name(model, f"{weight}_as_float")
        rewritten.append(helper.make_node("Cast", [node.input[0]], [value], to=float_type,
                                          name=graph.unique_name(model, f"{weight}_Cast")))
        s_name = _broadcastable(model, node, node.input[1], q, rewritten, done)
        if len(node.input) > 2 and node.input[2]:
            z_float = graph.unique_name(model, f"{weight}_zero_point_as_float")
            rewritten.append(helper.make_node("Cast", [node.input[2]], [z_float], to=float_type,
                                              name=graph.unique_name(model, f"{weight}_zero_point_Cast")))
            z_name = _broadcastable(model, node, z_float, q, rewritten, done, dims=tuple(inits[node.input[2]].dims))
            centred = graph.unique_name(model, f"{weight}_centred")
            rewritten.append(helper.make_node("Sub", [value, z_name], [centred], name=graph.unique_name(model, f"{weight}_Sub")))
            value = centred
        rewritten.append(helper.make_node("Mul", [value, s_name], [weight], name=graph.unique_name(model, f"{weight}_Mul")))
        done.weights.append(weight)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # scales / zero points only the old nodes read: their reshaped copies replace them
    read = {name for n in model.graph.node for name in n.input} | subgraphs.subgraph_reads(model)
    stale = {n.input[1] for n in dequantizers} | {n.input[2] for n in dequantizers if len(n.input) > 2}
    done.dropped = [_copy(t) for t in model.graph.initializer if t.name in stale and t.name not in read]
    graph.remove_initializers(model, [t.name for t in done.dropped])
    return done


def _constant(model: onnx.ModelProto, done: Folded, base: str, values: list[int]) -> str:
    name = graph.unique_name(model, base)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    done.added.append(name)
    return name


def _broadcastable(model: onnx.ModelProto, node: onnx.NodeProto, source: str, q: onnx.TensorProto,
                   nodes: list[onnx.NodeProto], done: Folded, dims: tuple[int, ...] | None = None) -> str:
    """A tensor holding ``source``'s scale (or float zero point) that broadcasts against q:
    per tensor as is; per axis reshaped to [1, .., C, .., 1]; per block repeated ``block_size`` times
    along the axis and cut to q's length there (Unsqueeze / Expand / Reshape / Slice, folded at load)."""
    inits = graph.initializers(model)
    if dims is None:
        dims = tuple(inits[source].dims)
    rank, axis = len(q.dims), graph.attribute(node, "axis", 1)
    block = graph.attribute(node, "block_size", 0)
    if not rank or not dims or (len(dims) == 1 and dims[0] == 1 and not block):
        return source
    axis %= rank
    weight = node.output[0]
    if not block:                                     # one value per channel along the axis
        shape = [1] * rank
        shape[axis] = dims[0]
        if source in done.own_scales and source in inits:
            tensor = inits[source]
            done.reshaped[source] = _copy(tensor)
            del tensor.dims[:]
            tensor.dims.extend(shape)
            return source
        out = graph.unique_name(model, f"{source}_along_axis")
        nodes.append(helper.make_node("Reshape", [source, _constant(model, done, f"{weight}_axis_shape", shape)], [out],
                                      name=graph.unique_name(model, f"{source}_Reshape")))
        return out
    widened = list(dims[:axis + 1]) + [block] + list(dims[axis + 1:])
    merged = list(dims)
    merged[axis] = dims[axis] * block
    names = [graph.unique_name(model, f"{source}_block_{step}") for step in ("unsqueezed", "expanded", "merged", "cut")]
    nodes += [
        helper.make_node("Unsqueeze", [source, _constant(model, done, f"{weight}_block_axis", [axis + 1])], [names[0]],
                         name=graph.unique_name(model, f"{source}_Unsqueeze")),
        helper.make_node("Expand", [names[0], _constant(model, done, f"{weight}_block_widened", widened)], [names[1]],
                         name=graph.unique_name(model, f"{source}_Expand")),
        helper.make_node("Reshape", [names[1], _constant(model, done, f"{weight}_block_merged", merged)], [names[2]],
                         name=graph.unique_name(model, f"{source}_Reshape")),
        helper.make_node("Slice", [names[2], _constant(model, done, f"{weight}_block_start", [0]),
                                   _constant(model, done, f"{weight}_block_end", [q.dims[axis]]),
                                   _constant(model, done, f"{weight}_block_slice_axis", [axis])], [names[3]],
                         name=graph.unique_name(model, f"{source}_Slice")),
    ]
    return names[3]


def unfold(model: onnx.ModelProto, done: Folded) -> None:
    del model.graph.node[:]
    model.graph.node.extend(done.nodes)
    graph.remove_initializers(model, done.added)
    model.graph.initializer.extend(done.dropped)
    for tensor in model.graph.initializer:
        if tensor.name in done.reshaped:
            tensor.CopyFrom(done.reshaped[tensor.name])


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def choose_form(model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: str, *, forced: str | None = None,
                runs: int = 30, budget_s: float = 0.4) -> dict[str, Any]:
    """Fold the weight-only DequantizeLinear nodes where that runs faster on the target (or as
    ``forced``: "folded" | "qdq"). Returns the decision for the report's step row.

    ``budget_s`` (0.4 s of interleaved runs; it was 3 s, a third of the ocr detector's static int8
    job, then 1 s, a fifth of MiniLM's, whose 8-bit MatMulNBits and folded MatMul tie at one
    sample: 6.8 to 7.5 ms each, either ahead from one race to the next) bounds only the races
    ``_settled`` cannot call: DequantizeLinear ahead by about the 3 % margin, where the two forms
    are about as fast whichever is kept. Where nothing fused a weight-only
    DequantizeLinear there is no race at all (``_session_and_fusions``)."""
    dequantizers = weight_only_dequantizers(model)
    if not dequantizers:
        return {"form": "qdq", "weights": []}
    if forced == "qdq":
        return {"form": "qdq", "weights": [], "reason": "format: qdq"}
    provider = sessions.provider_for(target)
    unfused = False
    if forced != "folded":
        before, unfused = _session_and_fusions(model, provider, dequantizers)
    done = fold(model, dequantizers)
    if forced == "folded":
        return {"form": "folded", "weights": done.weights}
    if unfused:
        del before
        return {"form": "folded", "weights": done.weights, "reason": UNFUSED}
    after = _session(model, provider)
    lat_qdq, lat_folded = metrics.latency([before, after], feeds, runs=runs, budget_s=budget_s, warmup=2,
                                          settled=_settled)
    timing = {"qdq": lat_qdq["p50"], "folded": lat_folded["p50"]}
    del before, after
    if not lat_qdq["p50"] < FASTER_BY * lat_folded["p50"]:
        return {"form": "folded", "weights": done.weights, "latency_ms": timing}
    unfold(model, done)
    return {"form": "qdq", "weights": [], "latency_ms": timing}


def _settled(times: list[list[float]]) -> bool:
    """Whether more runs would hardly change the decision (DequantizeLinear kept where its p50 beats
    the folded form's by ``FASTER_BY``): one form's fast quarter (p25) is not faster than the other's
    slow quarter (p75) with the margin, from the fifth interleaved run on (after two warm-up runs
    each: the first allocates and packs). The measurement used to run its whole budget (1.7 of the
    ocr detector's 3.5 CPU seconds of static int8) where the forms differ by 20 %. A tie settles for
    the folded form (DequantizeLinear's fast quarter is not 3 % faster); DequantizeLinear ahead by
    about the margin runs the budget. Not from the third run: on a loaded machine a run takes either its
    time or a preempted time slice (2 ms or 50 ms on the orientation classifier at load 16), and
    three runs of one form all preempted settled a race the wrong way."""
    qdq, folded = (np.asarray(t) for t in times)
    folded_sure = np.percentile(qdq, 25) >= FASTER_BY * np.percentile(folded, 75)
    qdq_sure = np.percentile(qdq, 75) < FASTER_BY * np.percentile(folded, 25)
    return bool(folded_sure or qdq_sure)


UNFUSED = ("no weight-only DequantizeLinear is fused in the graph ONNX Runtime runs: the folded form "
           "does the same work less the dequantization on every run (not timed)")


def _session_and_fusions(model: onnx.ModelProto, provider: str, dequantizers: list[onnx.NodeProto]):
    """The DequantizeLinear form's session, and whether, on the CPU provider, every weight-only
    DequantizeLinear is still a DequantizeLinear in the graph ONNX Runtime optimized for it.

    Then no kernel reads the integer weight fused (MatMulNBits and the like, which can beat the
    folded form): each run dequantizes the weight into a float tensor and runs the float layer on
    it, unpacked, which the folded form does on a constant, pre-packed weight. The folded form is
    then at least as fast, and the race (two sessions, two warm-ups and five or more timed runs of
    each form; 1.3 of the ocr detector's 3.4 CPU seconds of static int8) has nothing to tell. Where
    something fused one, or on another provider, or for a model too large to write the optimized
    graph of here, the race decides."""
    weights = sessions.weight_bytes(model)
    if provider != "CPUExecutionProvider" or weights is None or weights >= graph.EXTERNAL_DATA_THRESHOLD // 2:
        return _session(model, provider), False
    with tempfile.TemporaryDirectory(prefix="fw-form-") as scratch:
        path = Path(scratch) / "optimized.onnx"
        run = sessions.session(model, sessions.providers_for(provider), optimized_to=path)
        try:
            optimized = onnx.load(str(path), load_external_data=False)
        except Exception:           # not written (a provider or build that cannot): race instead
            return run, False
    kept = {output for node in optimized.graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    return run, all(node.output[0] in kept for node in dequantizers)


def _session(model: onnx.ModelProto, provider: str):
    return sessions.session(model, sessions.providers_for(provider))
