"""Identical small initializers stored once: the scales and zero points that quantization writes per
Q/DQ pair and per layer (scalar activation zero points, per-channel weight zero points of zeros,
int32 bias zero points) repeat hundreds of times in a quantized CNN, and each copy costs its bytes
plus a name and a TensorProto header in the file. On the PP-OCRv4 detector (2.3 MB as int8) they were
~3% of the file.

Owns only that deduplication. Exact by construction: a reader is pointed at a tensor with the same
data type, shape and bytes. Initializers read from inside an If / Loop / Scan body and graph inputs
(an overridable initializer) are left alone: renaming them would need the body's scoping rules.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from worker.pipeline import subgraphs

MAX_BYTES = 4096      # scales / zero points / small bias grids; weights are never this small and unique anyway


def _key(tensor: onnx.TensorProto) -> tuple | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    array = numpy_helper.to_array(tensor)
    if array.nbytes > MAX_BYTES:
        return None
    return tensor.data_type, tuple(tensor.dims), array.tobytes()


def share_identical(model: onnx.ModelProto) -> int:
    """Point every main-graph reader of a small initializer at the first identical one and drop the
    copies; returns how many initializers were dropped."""
    pinned = subgraphs.subgraph_reads(model) | {value.name for value in model.graph.input} \
        | {value.name for value in model.graph.output}
    first: dict[tuple, str] = {}
    replace: dict[str, str] = {}
    for tensor in model.graph.initializer:
        if tensor.name in pinned:
            continue
        key = _key(tensor)
        if key is None:
            continue
        if key in first:
            replace[tensor.name] = first[key]
        else:
            first[key] = tensor.name
    if not replace:
        return 0
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in replace:
                node.input[index] = replace[name]
    kept = [tensor for tensor in model.graph.initializer if tensor.name not in replace]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(replace)
