"""Which Constant nodes of an ONNX graph hold a layer's weights, shared by the upload's parameter
count (``core.onnx_guard``) and the pipeline, which lifts them to initializers
(``worker.pipeline.quantize.lift_constants``) so that weight steps see them.

Converted models (paddle2onnx, some TensorFlow exports) keep every weight in a Constant node rather
than an initializer. A Constant counts as a weight when its tensor is floating point and its output
is read where a layer takes its weight: MatMul / Gemm input B, Conv / ConvTranspose W, Gather's
table, a recurrent cell's W, R and B. Inside If / Loop / Scan bodies (at any depth) the pipeline lifts more
(``worker.pipeline.body_weights``): a float Constant of rank >= 2 that a body layer reads as its
weight directly or through layout ops (PyTorch's LSTM gate re-ordering by Slice / Concat); the
upload counts those too (``body_constant_weight_params``), so a model whose every weight sits in
the branches of an If (silero-vad) is not described as weightless.
"""
from __future__ import annotations

import math

import onnx

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
# where a layer reads a weight the pipeline lifts, in the main graph and inside bodies alike
# (recurrent cells: W, R and B; main-graph ones were missed, so an exported LSTM / GRU whose weights
# sat in Constant nodes was refused as weightless or left float)
WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,),
                 "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
# ops that only move or re-shape values: a weight computed from constants by them is lifted exactly
LAYOUT_OPS = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten",
                        "Split", "Gather"})


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
                     for index in WEIGHT_INPUTS.get(node.op_type, ()) if len(node.input) > index}
    return [node for node in model.graph.node
            if constant_tensor(node) is not None and node.output[0] in weight_inputs]


def constant_weight_params(model: onnx.ModelProto) -> int:
    """Elements over the weight-carrying Constant nodes (what the pipeline lifts, graph outputs aside)."""
    graph_outputs = {o.name for o in model.graph.output}
    return sum(math.prod(constant_tensor(node).dims) for node in constant_weights(model)
               if node.output[0] not in graph_outputs)


def _bodies(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def body_constant_weight_params(model: onnx.ModelProto) -> int:
    """Elements over the float Constants (rank >= 2) inside bodies that a layer reads as its weight,
    directly or through ``LAYOUT_OPS``: what ``worker.pipeline.body_weights`` lifts."""
    constants: dict[str, int] = {}
    weight_reads: set[str] = set()

    def visit(g: onnx.GraphProto, in_body: bool) -> None:
        for node in g.node:
            if in_body and (tensor := constant_tensor(node)) is not None and len(tensor.dims) >= 2:
                constants[node.output[0]] = math.prod(tensor.dims)
            if in_body and node.op_type in LAYOUT_OPS:
                weight_reads.update(node.input)
            for index in WEIGHT_INPUTS.get(node.op_type, ()) if in_body else ():
                if index < len(node.input):
                    weight_reads.add(node.input[index])
            for body in _bodies(node):
                visit(body, True)

    visit(model.graph, False)
    return sum(size for name, size in constants.items() if name in weight_reads)
