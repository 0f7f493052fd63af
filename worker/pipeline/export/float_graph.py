"""The compressed model as a plain float graph, for converters that quantize on their own terms
(LiteRT's): ONNX Runtime's fused weight MatMuls (DynamicQuantizeMatMul, MatMulNBits) as
MatMul with the float weight they encode, every constant subgraph (a weight's DequantizeLinear, the dequantize form's Cast and
Mul, a cluster step's codebook lookup) evaluated once into a float initializer, and every
activation QuantizeLinear -> DequantizeLinear pair replaced by the Clip to its interval (the
converter re-quantizes from the job's calibration data; the clamp stays, since a static quantizer
may have folded a Relu into it).

The weights keep the values compression gave them: an int8 weight becomes the float values of its
grid, a pruned weight keeps its zeros, so the converter's own per-channel int8 (or fp16) storage
lands on the same numbers.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import graph as graph_mod, subgraphs
from worker.pipeline.distill.layers import constant_nodes, constant_values, linear_layer
from worker.pipeline.graph import fresh_name


def _is_constant_subgraph_output(model: onnx.ModelProto) -> list[str]:
    """Outputs of constant nodes read by a node that is not constant itself (what must become initializers)."""
    constant = constant_nodes(model)
    produced = {out for node in constant for out in node.output if out}
    constant_keys = {tuple(node.output) for node in constant}
    read = {name for node in model.graph.node if tuple(node.output) not in constant_keys for name in node.input}
    read |= {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
    return sorted(produced & read)


def float_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A new float model computing the same function (up to activation rounding), and counts of
    what was folded / removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = _is_constant_subgraph_output(out)
    values = constant_values(out, names)
    constant_keys = {tuple(node.output) for node in constant_nodes(out)}
    kept = [node for node in out.graph.node if tuple(node.output) not in constant_keys]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    for name, value in values.items():
        out.graph.initializer.append(numpy_helper.from_array(value, name))
    contrib = _contrib_to_matmul(out)
    pairs = _drop_activation_qdq(out)
    _prune_inits(out)
    graph_mod.sort_graph(out)
    return out, {"constants_folded": len(values), "activation_qdq_to_clip": pairs, "contrib_matmuls_to_float": contrib}


def _prune_inits(model: onnx.ModelProto) -> None:
    # what an If / Loop body reads from here is used too (an EmbeddingBag's Loop lost its Slice bounds)
    used = ({name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
            | subgraphs.subgraph_reads(model))
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ONNX Runtime's fused weight MatMuls, which other converters do not know: the float weight they stand for
CONTRIB_MATMULS = {("com.microsoft", "DynamicQuantizeMatMul"): 4, ("com.microsoft", "MatMulNBits"): 5}


def _contrib_to_matmul(model: onnx.ModelProto) -> int:
    """Replace each ``CONTRIB_MATMULS`` node by ``MatMul(A, W)`` (+ ``Add`` of its bias) with W the
    float weight it encodes (``distill.layers.linear_layer`` reads it); returns the count."""
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {t.name for t in model.graph.initializer}
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        bias_index = CONTRIB_MATMULS.get((node.domain, node.op_type))
        if bias_index is None:
            rewritten.append(node)
            continue
        layer, why = linear_layer(model, node)
        if layer is None:
            raise ValueError(f"{node.op_type} {node.name}: {why}")
        weight = fresh_name(f"{node.name or node.output[0]}.float_weight", taken)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(layer.weight.read(model), np.float32), weight))
        bias = node.input[bias_index] if len(node.input) > bias_index else ""
        product = fresh_name(node.output[0] + "_matmul", taken) if bias else node.output[0]
        rewritten.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if bias:
            rewritten.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return count


def _clip_range(model: onnx.ModelProto, quantize: onnx.NodeProto) -> tuple[float, float] | None:
    """The interval a per-tensor QuantizeLinear -> DequantizeLinear pair clamps to, or None when
    its scale or zero point is not a constant scalar."""
    inits = {t.name: t for t in model.graph.initializer}
    if quantize.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[quantize.input[1]])
    if len(quantize.input) > 2 and quantize.input[2]:
        if quantize.input[2] not in inits:
            return None
        zero = numpy_helper.to_array(inits[quantize.input[2]])
    else:
        zero = np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1 or zero.dtype not in (np.int8, np.uint8):
        return None
    info = np.iinfo(zero.dtype)
    s, z = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
    return (info.min - z) * s, (info.max - z) * s


def _drop_activation_qdq(model: onnx.ModelProto) -> int:
    """Replace every ``DequantizeLinear(QuantizeLinear(x))`` on an activation by ``Clip(x, lo, hi)``,
    the interval the pair clamps to: the rounding goes (the converter re-quantizes), the clamping
    stays (a static quantizer folds a Relu into a range that starts at zero: dropping the pair
    would drop the Relu). Returns the count."""
    producers = {node.output[0]: node for node in model.graph.node if node.output}
    outputs = {o.name for o in model.graph.output}
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {t.name for t in model.graph.initializer}
    replaced = 0
    rewritten: list[onnx.NodeProto] = []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and source is not None \
                and source.op_type == "QuantizeLinear" and source.domain in ("", "ai.onnx"):
            bounds = _clip_range(model, source)
            if bounds is not None:
                names = []
                for suffix, value in zip(("_lo", "_hi"), bounds):
                    name = fresh_name(node.output[0] + suffix, taken)
                    model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
                    names.append(name)
                rewritten.append(helper.make_node("Clip", [source.input[0], *names], [node.output[0]],
                                                  name=node.name or node.output[0]))
                replaced += 1
                continue
        rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # QuantizeLinear nodes nobody reads any more go too
    read = {name for node in model.graph.node for name in node.input} | outputs | subgraphs.subgraph_reads(model)
    live = [node for node in model.graph.node
            if not (node.op_type == "QuantizeLinear" and not any(o in read for o in node.output))]
    del model.graph.node[:]
    model.graph.node.extend(live)
    return replaced
