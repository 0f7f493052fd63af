"""One run-time quantization for the DynamicQuantizeMatMul ops that read the same float tensor.

``DynamicQuantizeMatMul(A, B_i, s_i, z_i, bias_i)`` quantizes A to uint8 inside every call (per
tensor: min / max over all of A, ``scale = (max(0, max) - min(0, min)) / 255``, zero point from it).
When several of them read the same A (separate Q / K / V projections, or the thirds
``attention_layout`` makes of a packed QKV projection), that work is done once instead::

    Aq, a_scale, a_zero = DynamicQuantizeLinear(A)
    MatMulIntegerToFloat(Aq, B_i, a_scale, s_i, a_zero, z_i, bias_i)      for each i

The same quantization parameters over the same values, the same integer products (exact), the
same rescale: the outputs are those of the fused ops.

And when that A is a Transpose of another float tensor read by nothing else, the transpose moves
after the quantization (``DynamicQuantizeLinear`` looks at min / max only, which a permutation
does not change), so it moves uint8 values: a quarter of the bytes.
"""
from __future__ import annotations

import onnx
from onnx import helper

from worker.pipeline import graph, subgraphs

MS_DOMAIN = "com.microsoft"


def _groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "DynamicQuantizeMatMul" and node.domain == MS_DOMAIN:
            groups.setdefault(node.input[0], []).append(node)
    return {a: nodes for a, nodes in groups.items() if len(nodes) > 1}


def _quantize_before_transpose(model: onnx.ModelProto, quantize: onnx.NodeProto) -> bool:
    """DQL(Transpose(x)) -> Transpose(DQL(x)) when the transposed float tensor has no other reader."""
    source = quantize.input[0]
    transpose = graph.producers(model).get(source)
    outputs = {o.name for o in model.graph.output} | subgraphs.subgraph_reads(model)
    if transpose is None or transpose.op_type != "Transpose" or source in outputs:
        return False
    if len(graph.consumers(model).get(source, [])) != 1:
        return False
    quantized = quantize.output[0]
    moved = graph.unique_name(model, f"{quantized}_before_transpose")
    quantize.input[0] = transpose.input[0]
    quantize.output[0] = moved
    transpose.input[0] = moved
    transpose.output[0] = quantized
    return True


def share_input_quantization(model: onnx.ModelProto) -> int:
    """Rewrite in place (see the module docstring); returns how many float tensors are now
    quantized once for several matmuls."""
    groups = _groups(model)
    for source, nodes in groups.items():
        base = graph.unique_name(model, f"{source}_quantized")
        scale, zero = graph.unique_name(model, f"{source}_scale"), graph.unique_name(model, f"{source}_zero_point")
        quantize = helper.make_node("DynamicQuantizeLinear", [source], [base, scale, zero],
                                    name=graph.unique_name(model, f"{source}_DynamicQuantizeLinear"))
        position = min(list(model.graph.node).index(n) for n in nodes)
        for node in nodes:
            inputs = list(node.input) + [""] * (5 - len(node.input))
            replacement = helper.make_node("MatMulIntegerToFloat",
                                           [base, inputs[1], scale, inputs[2], zero, inputs[3], inputs[4]],
                                           list(node.output), name=node.name, domain=MS_DOMAIN)
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            model.graph.node.insert(index, replacement)
        model.graph.node.insert(position, quantize)
        # insert() stored a copy; rewire the node the graph holds
        _quantize_before_transpose(model, model.graph.node[position])
    if groups:
        graph.sort_graph(model)
    return len(groups)
