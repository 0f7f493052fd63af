"""Weight-only DequantizeLinear in the form ONNX Runtime runs fastest on the target.

ONNX Runtime keeps DequantizeLinear out of constant folding (its QDQ fusions must see it), so a
weight-only layer's weight is dequantized on every run, and the layer no longer reads a constant
weight: the CPU provider can then neither pre-pack it nor move a Conv to its blocked (NCHWc) layout.
On the digits CNN that costs 1.82 ms against the float model's 1.13 ms. The same integers, scales
and zero points written as

    Cast(q -> float) [- Cast(zero point)] * scale        (scale shaped to broadcast along the axis)

compute the same values ((q - z) * s in float32) and are folded once when the session loads: the
layer runs on a constant float weight at the float model's speed, while the file keeps its integers.
The price is memory at run time (the float weight, as in the original model).

``choose_form`` measures the model both ways on the target (whole model, interleaved runs, one batch
of the data the report uses) and keeps the folded form only where it is measurably faster. It runs
once on the recipe's final model (runner), so that steps after ``quantize`` (``distill``) still see
DequantizeLinear and its grid. Left alone: pairs that static int8 fuses into integer kernels (a
reader whose activation comes from a DequantizeLinear), blocked grids, sub-byte types Cast cannot
read at the model's opset, and recipes that asked for ``format: qdq``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.pipeline import activations, graph, metrics

# the integer types Cast reads, and the opset from which it does
CAST_OPSET = {TensorProto.INT8: 13, TensorProto.UINT8: 13, TensorProto.INT4: 21, TensorProto.UINT4: 21,
              TensorProto.INT2: 25, TensorProto.UINT2: 25}
FASTER_BY = 0.97       # the folded form must beat the DequantizeLinear form by 3% to be kept


def weight_only_dequantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes of the main graph that dequantize a stored weight for float layers."""
    inits = graph.initializers(model)
    producers = graph.producers(model)
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    version = graph.opset(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        names = [name for name in node.input if name]
        if not all(name in inits for name in names) or graph.attribute(node, "block_size", 0):
            continue
        if CAST_OPSET.get(inits[node.input[0]].data_type, 10**6) > version or node.output[0] in outputs:
            continue
        if node.output[0] in graph.subgraph_reads(model):
            continue
        fused = any(producers.get(other) is not None and producers[other].op_type == "DequantizeLinear"
                    for reader, _ in readers.get(node.output[0], []) for other in reader.input
                    if other and other != node.output[0])
        if not fused and readers.get(node.output[0]):
            found.append(node)
    return found


@dataclass
class Folded:
    """What ``fold`` changed, so that ``unfold`` can put the DequantizeLinear form back."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)      # the graph's nodes before
    added: list[str] = field(default_factory=list)                 # initializers added
    dropped: list[onnx.TensorProto] = field(default_factory=list)  # initializers only they read
    weights: list[str] = field(default_factory=list)


def fold(model: onnx.ModelProto, dequantizers: list[onnx.NodeProto]) -> Folded:
    """Rewrite each DequantizeLinear as Cast [- Cast(z)] * scale, in place (see the module doc)."""
    done = Folded(nodes=[_copy(n) for n in model.graph.node])
    inits = graph.initializers(model)
    targets = {node.output[0] for node in dequantizers}
    rewritten: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in targets:
            rewritten.append(_copy(node))
            continue
        weight = node.output[0]
        q = inits[node.input[0]]
        scale = numpy_helper.to_array(inits[node.input[1]])
        axis = graph.attribute(node, "axis", 1)
        shape = [1] * len(q.dims)
        if scale.ndim == 1 and len(q.dims):
            shape[axis % len(q.dims)] = scale.shape[0]
        s_name = graph.unique_name(model, f"{weight}_scale_folded")
        model.graph.initializer.append(numpy_helper.from_array(scale.reshape(shape) if q.dims else scale, s_name))
        done.added.append(s_name)
        value = graph.unique_name(model, f"{weight}_as_float")
        rewritten.append(helper.make_node("Cast", [node.input[0]], [value], to=scale_type(inits[node.input[1]]),
                                          name=graph.unique_name(model, f"{weight}_Cast")))
        if len(node.input) > 2 and node.input[2]:
            zero = inits[node.input[2]]
            z_name = node.input[2]
            if len(zero.dims) == 1 and len(q.dims):
                z_name = graph.unique_name(model, f"{weight}_zero_point_folded")
                model.graph.initializer.append(numpy_helper.from_array(
                    numpy_helper.to_array(zero).reshape(shape), z_name))
                done.added.append(z_name)
            z_float = graph.unique_name(model, f"{weight}_zero_point_as_float")
            centred = graph.unique_name(model, f"{weight}_centred")
            rewritten += [helper.make_node("Cast", [z_name], [z_float], to=scale_type(inits[node.input[1]]),
                                           name=graph.unique_name(model, f"{weight}_zero_point_Cast")),
                          helper.make_node("Sub", [value, z_float], [centred], name=graph.unique_name(model, f"{weight}_Sub"))]
            value = centred
        rewritten.append(helper.make_node("Mul", [value, s_name], [weight], name=graph.unique_name(model, f"{weight}_Mul")))
        done.weights.append(weight)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # scales / zero points only the old nodes read: their reshaped copies replace them
    read = {name for n in model.graph.node for name in n.input} | graph.subgraph_reads(model)
    stale = {n.input[1] for n in dequantizers} | {n.input[2] for n in dequantizers if len(n.input) > 2}
    done.dropped = [_copy(t) for t in model.graph.initializer if t.name in stale and t.name not in read]
    graph.remove_initializers(model, [t.name for t in done.dropped])
    return done


def unfold(model: onnx.ModelProto, done: Folded) -> None:
    del model.graph.node[:]
    model.graph.node.extend(done.nodes)
    graph.remove_initializers(model, done.added)
    model.graph.initializer.extend(done.dropped)


def scale_type(scale: onnx.TensorProto) -> int:
    return scale.data_type


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def choose_form(model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: str, *, forced: str | None = None,
                runs: int = 30, budget_s: float = 3.0) -> dict[str, Any]:
    """Fold the weight-only DequantizeLinear nodes where that runs faster on the target (or as
    ``forced``: "folded" | "qdq"). Returns the decision for the report's step row."""
    dequantizers = weight_only_dequantizers(model)
    if not dequantizers:
        return {"form": "qdq", "weights": []}
    if forced == "qdq":
        return {"form": "qdq", "weights": [], "reason": "format: qdq"}
    provider = metrics.provider_for(target)
    if forced != "folded":
        before = _session(model, provider)
    done = fold(model, dequantizers)
    if forced == "folded":
        return {"form": "folded", "weights": done.weights}
    after = _session(model, provider)
    lat_qdq, lat_folded = metrics.latency([before, after], feeds, runs=runs, budget_s=budget_s)
    timing = {"qdq": lat_qdq["p50"], "folded": lat_folded["p50"]}
    del before, after
    if lat_folded["p50"] < FASTER_BY * lat_qdq["p50"]:
        return {"form": "folded", "weights": done.weights, "latency_ms": timing}
    unfold(model, done)
    return {"form": "qdq", "weights": [], "latency_ms": timing}


def _session(model: onnx.ModelProto, provider: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return activations.build_session(model, options, providers)
