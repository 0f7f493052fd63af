"""DequantizeLinear zero points that say nothing, left out of the file.

Symmetric int8 weights (one scale per output channel) and int32 biases are written with a zero
point tensor of zeros, one per channel. ONNX defines an absent ``x_zero_point`` as 0 of x's type,
so the input is dropped where the tensor is all zeros, of type int8 or int32, and read only as a
DequantizeLinear's zero point, and where ONNX Runtime fuses the same integer kernels without it
(measured, onnxruntime 1.2x): an int32 bias's, and an int8 weight's read by Conv / ConvTranspose
(QLinearConv), by a recurrent cell or from inside an If / Loop / Scan body (no fusion there). A
MatMul / Gemm weight keeps its zero point: without it ONNX Runtime no longer fuses QGemm /
QLinearMatMul. A QuantizeLinear's zero point stays too (it sets the output type). On silero-vad's
16 kHz network these zeros were 5.4 KB of a 372 KB file, 1.5 % of the size ratio, for nothing.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from worker.pipeline import graph, subgraphs

DEFAULT_ZERO_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
# readers of an int8 weight's DequantizeLinear that ONNX Runtime fuses the same without its zero point
FUSED_WITHOUT_ZERO_POINT = ("Conv", "ConvTranspose", "LSTM", "GRU", "RNN")


def _needs_zero_point(node: onnx.NodeProto, tensor: onnx.TensorProto, readers: dict, body_reads: set[str]) -> bool:
    if tensor.data_type == onnx.TensorProto.INT32:
        return False                          # a bias: its pattern fuses either way
    users = readers.get(node.output[0], [])
    return not (users or node.output[0] in body_reads) or \
        any(user.op_type not in FUSED_WITHOUT_ZERO_POINT for user, _ in users)


def drop_zero_points(model: onnx.ModelProto) -> list[str]:
    """Drop all-zero int8 / int32 zero points read only by main-graph DequantizeLinear nodes;
    returns the names dropped."""
    inits = graph.initializers(model)
    readers = graph.consumers(model)
    body_reads = subgraphs.subgraph_reads(model)
    kept = {o.name for o in model.graph.output} | body_reads
    dropped = []
    for name, tensor in inits.items():
        users = readers.get(name, [])
        if (tensor.data_type not in DEFAULT_ZERO_TYPES or name in kept or not users
                or any(node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or index != 2
                       or len(node.input) != 3 for node, index in users)):
            continue
        if any(_needs_zero_point(node, tensor, readers, body_reads) for node, _ in users):
            continue
        if np.any(numpy_helper.to_array(tensor)):
            continue
        for node, _ in users:
            del node.input[2]
        dropped.append(name)
    graph.remove_initializers(model, dropped)
    return dropped
