"""Identical small initializers stored once: the scales and zero points that quantization writes per
Q/DQ pair and per layer (scalar activation zero points, per-channel weight zero points of zeros,
int32 bias zero points) repeat hundreds of times in a quantized CNN, and each copy costs its bytes
plus a name and a TensorProto header in the file. On the PP-OCRv4 detector (2.3 MB as int8) they were
~3% of the file.

The main graph's Constant nodes count too: ``lift_constants`` makes each an initializer of the same
name first (exact; ONNX Runtime treats both as constants). An exporter writes one per use (paddle2onnx:
hard-swish's 3 and 6 once per layer, 18 times each on the PP-OCR classifier, each a node with its
own output name), so shared they cost their bytes once.

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


def lift_constants(model: onnx.ModelProto) -> int:
    """Main-graph Constant nodes holding a tensor (``value``) become initializers of their output's
    name; returns how many. Not where an initializer would be a graph input (IR version < 4) or
    where the Constant's output is a graph output."""
    if model.ir_version < 4:
        return 0
    outputs = {value.name for value in model.graph.output}
    kept, lifted = [], []
    for node in model.graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value" and node.output[0] not in outputs):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            lifted.append(tensor)
        else:
            kept.append(node)
    if lifted:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(lifted)
    return len(lifted)


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
