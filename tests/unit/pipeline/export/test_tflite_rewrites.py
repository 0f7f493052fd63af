"""Rewrites made before onnx2tf sees the graph: the same values, in ops it converts."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from worker.pipeline.export.tflite import bool_expands_as_integers


def test_an_expand_of_a_bool_mask_becomes_an_integer_expand_with_the_same_values():
    """A transformers BERT export expands a bool attention mask: onnx2tf multiplies by ones there,
    which TensorFlow refuses for bool (all-MiniLM-L6-v2's conversion failed on it)."""
    nodes = [helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL, name="to_bool"),
             helper.make_node("Unsqueeze", ["keep", "axes"], ["keep4"], name="unsq"),
             helper.make_node("Expand", ["keep4", "shape"], ["wide"], name="expand"),
             helper.make_node("Where", ["wide", "zero", "low"], ["bias"], name="where"),
             helper.make_node("Add", ["scores", "bias"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array([2, 3, 5, 5], np.int64), "shape"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "low")]
    graph_ = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 5]),
                                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3, 5, 5])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 5])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert bool_expands_as_integers(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(rewritten).graph.value_info}
    assert all(types[n.input[0]] != TensorProto.BOOL for n in rewritten.graph.node if n.op_type == "Expand")
    feeds = {"mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64),
             "scores": np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)}
    np.testing.assert_array_equal(builders.run_ort(model, feeds)[0], builders.run_ort(rewritten, feeds)[0])
    assert bool_expands_as_integers(builders.mlp()) == 0       # nothing to do elsewhere
