"""Weights held in Constant nodes (common in converted models) lifted to initializers, so the
steps that select and rewrite weights by initializer name see them.

Only a Constant whose float tensor is read where a layer takes its weight (``graph.weight_layers``'
positions: MatMul / Gemm B, Conv / ConvTranspose W, Gather's table) is lifted; the initializer takes
the Constant's output name, so every reader keeps reading the same name.
"""
from __future__ import annotations

import onnx

from worker.pipeline import graph

_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR:
        return None
    return attr.t if attr.t.data_type in _FLOAT else None


def constant_weights(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Constant nodes of the main graph whose output is some layer's weight input."""
    weight_inputs = {node.input[index] for node in model.graph.node
                     for op, index in _WEIGHT_INPUT.items()
                     if node.op_type == op and len(node.input) > index}
    return [node for node in model.graph.node
            if _constant_tensor(node) is not None and node.output[0] in weight_inputs]


def lift_constant_weights(model: onnx.ModelProto) -> list[str]:
    """Move weight-carrying Constant nodes' tensors to initializers; return the lifted names."""
    graph_outputs = {o.name for o in model.graph.output}
    lifted = []
    for node in constant_weights(model):
        name = node.output[0]
        if name in graph_outputs:
            continue     # an initializer cannot be a graph output by itself; leave it
        tensor = onnx.TensorProto()
        tensor.CopyFrom(_constant_tensor(node))
        tensor.name = name
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
        lifted.append(name)
    if lifted:
        graph.sort_graph(model)
    return lifted
