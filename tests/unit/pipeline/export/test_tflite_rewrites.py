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


def test_paddle_style_inputs_and_names_are_made_what_tensorflow_takes():
    """paddle2onnx writes -1 for the batch and names nodes ``Softmax@0``: TensorFlow refuses both
    ("Dimension -1 must be >= 0", "not a valid scope name"; the PP-OCR classifier failed on them)."""
    from worker.pipeline.export.tflite import fixed_input_shapes, scope_safe_node_names

    model = builders.mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    model.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    model.graph.node[2].name = "Relu@0"
    model.graph.node[3].name = "fc 2:x"
    model.graph.value_info.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["batch", 256]))
    reference = builders.run_ort(builders.mlp(), {"x": np.ones((1, 128), np.float32)})[0]
    fixed_input_shapes(model, {"x": [1, 128]})
    assert scope_safe_node_names(model) == 2
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 128]
    assert all(d.dim_value >= 0 for d in model.graph.output[0].type.tensor_type.shape.dim)
    assert not model.graph.value_info
    assert [n.name for n in model.graph.node][2:4] == ["Relu_0", "fc_2_x"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(builders.run_ort(model, {"x": np.ones((1, 128), np.float32)})[0], reference)
