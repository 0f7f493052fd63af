"""Which Constant nodes of an ONNX graph hold a layer's weights, shared by the upload's parameter
count (``core.onnx_guard``) and the pipeline, which lifts them to initializers
(``worker.pipeline.quantize.lift_constants``) so that weight steps see them.

Converted models (paddle2onnx, some TensorFlow exports) keep every weight in a Constant node rather
than an initializer. A Constant counts as a weight when its tensor is floating point and its output
is read where a layer takes its weight: MatMul / Gemm input B, Conv / ConvTranspose W, Gather's
table. Only the main graph is looked at, as only it is lifted.
"""
from __future__ import annotations

import math

import onnx

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The float tensor of a plain ``Constant(value=...)`` node, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR:
        return None
    return attr.t if attr.t.data_type in FLOAT_TYPES else None


def constant_weights(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Constant nodes of the main graph whose output is some layer's weight input."""
    weight_inputs = {node.input[index] for node in model.graph.node
                     for op, index in WEIGHT_INPUT.items()
                     if node.op_type == op and len(node.input) > index}
    return [node for node in model.graph.node
            if constant_tensor(node) is not None and node.output[0] in weight_inputs]


def constant_weight_params(model: onnx.ModelProto) -> int:
    """Elements over the weight-carrying Constant nodes (what the pipeline lifts, graph outputs aside)."""
    graph_outputs = {o.name for o in model.graph.output}
    return sum(math.prod(constant_tensor(node).dims) for node in constant_weights(model)
               if node.output[0] not in graph_outputs)
