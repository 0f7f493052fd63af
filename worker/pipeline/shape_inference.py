"""Shape inference on a model of any size: ``inferred_shapes`` gives every tensor shape ONNX's
inference can make concrete (symbolic dims taken as 1 or as a feed's), run on a ``skeleton`` that
holds only the small initializers, so no weight is copied; com.microsoft MatMulNBits, which ONNX has
no shape function for, is given its output shape so inference continues past it."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from worker.pipeline import graph

SKELETON_MAX_ELEMENTS = 4096   # initializers at most this big stay in the shape-inference skeleton


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference that holds only small initializers; the big ones
    become graph inputs of the same type and shape, so no weight is copied."""
    g = onnx.GraphProto()
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    listed = {value.name for value in model.graph.input}
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if count <= SKELETON_MAX_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(tensor)
        elif tensor.name not in listed:
            g.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sk.graph.CopyFrom(g)
    return sk


def _fix_symbolic(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None = None,
                  guessed: list[str] | None = None) -> None:
    """Concrete input dims: those of ``given`` (a feed's shapes), else 1 for every symbolic dim.
    ``guessed`` collects ``input[axis]`` of each symbolic dim past the first (the batch axis, 1 by
    the definition of per-sample figures) that was taken as 1 for want of a shape."""
    given = given or {}
    for value in model.graph.input:
        shape = given.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if shape is not None and len(shape) == len(dims):
            for dim, size in zip(dims, shape):
                dim.dim_value = int(size)
            continue
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
                if axis > 0 and guessed is not None:
                    guessed.append(f"{value.name}[{axis}]")


def _infer(sk: onnx.ModelProto) -> onnx.ModelProto:
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(sk, data_prop=data_prop)
        except Exception:   # inference is best effort: MACs of what it cannot type are 0
            continue
    return sk


def _contrib_output_shapes(sk: onnx.ModelProto) -> bool:
    """ONNX has no shape function for com.microsoft MatMulNBits: give its output ``A[..., :-1] + [N]``
    as value_info so that inference continues past it. True when something was added."""
    known = {v.name: v for v in list(sk.graph.input) + list(sk.graph.value_info) + list(sk.graph.output)
             if v.type.tensor_type.HasField("shape")}
    added = False
    for node in sk.graph.node:
        if node.op_type != "MatMulNBits" or not node.output or node.output[0] in known:
            continue
        a = known.get(node.input[0])
        if a is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in a.type.tensor_type.shape.dim]
        value = helper.make_tensor_value_info(node.output[0], a.type.tensor_type.elem_type,
                                              dims[:-1] + [int(graph.attribute(node, "N", 0))])
        sk.graph.value_info.append(value)
        known[node.output[0]] = value
        added = True
    return added


def inferred_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]] | None = None,
                    guessed: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor shape inference could make concrete, with the graph inputs
    of the shapes ``inputs`` gives (symbolic dims otherwise taken as 1, listed in ``guessed``)."""
    sk = skeleton(model)
    _fix_symbolic(sk, inputs, guessed)
    sk = _infer(sk)
    for _ in range(16):
        if not _contrib_output_shapes(sk):
            break
        sk = _infer(sk)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in list(sk.graph.input) + list(sk.graph.value_info) + list(sk.graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = []
        for dim in tensor_type.shape.dim:
            dims.append(dim.dim_value if dim.HasField("dim_value") else 1)
        shapes[value.name] = tuple(dims)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes
