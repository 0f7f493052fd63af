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


def _bert_like(d: int = 16, seq: int = 6) -> onnx.ModelProto:
    """PyTorch's export of a BERT block's pieces: a Linear as MatMul then Add(bias, product), the
    erf GELU (both placements of its 0.5), and the attention mask as Where over a 4-D bool."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [node("MatMul", ["x", "W"], ["mm"], name="query/MatMul"),
             node("Add", ["bias", "mm"], ["h"], name="query/Add"),
             # gelu 1: x * (1 + erf(x / sqrt2)) * 0.5
             node("Div", ["h", "sqrt2"], ["g1_div"], name="g1/Div"), node("Erf", ["g1_div"], ["g1_erf"], name="g1/Erf"),
             node("Add", ["g1_erf", "one"], ["g1_add"], name="g1/Add"), node("Mul", ["h", "g1_add"], ["g1_mul"], name="g1/Mul"),
             node("Mul", ["g1_mul", "half"], ["g1"], name="g1/Mul_1"),
             # gelu 2: (0.5 * x) * (1 + erf(x * (1 / sqrt2)))
             node("Mul", ["g1", "inv_sqrt2"], ["g2_s"], name="g2/Mul"), node("Erf", ["g2_s"], ["g2_erf"], name="g2/Erf"),
             node("Add", ["one", "g2_erf"], ["g2_add"], name="g2/Add"), node("Mul", ["half", "g1"], ["g2_half"], name="g2/Half"),
             node("Mul", ["g2_half", "g2_add"], ["g2"], name="g2/Mul_1"),
             node("Transpose", ["g2"], ["g2t"], name="kt", perm=[0, 2, 1]),
             node("MatMul", ["g2", "g2t"], ["scores3"], name="scores"),
             node("Unsqueeze", ["scores3", "axes1"], ["scores"], name="heads"),
             node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL, name="to_bool"),
             node("Unsqueeze", ["keep", "axes12"], ["keep4"], name="unsq"),
             node("Expand", ["keep4", "shape4"], ["wide"], name="expand"),
             node("Where", ["wide", "zero", "low"], ["mask_bias"], name="where"),
             node("Add", ["scores", "mask_bias"], ["masked"], name="masked"),
             node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((d, d))).astype(np.float32), "W"),
             numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array(1.4142135381698608, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(0.7071067690849304, np.float32), "inv_sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
             numpy_helper.from_array(np.array([1, 1, seq, seq], np.int64), "shape4"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "low")]
    graph_ = helper.make_graph(nodes, "bert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d]),
                                               helper.make_tensor_value_info("mask", TensorProto.INT64, [1, seq])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, seq, seq])], inits)
    return helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])


def test_a_bert_blocks_gelus_mask_and_bias_adds_become_ops_litert_converts_with_the_same_values():
    from worker.pipeline.export.tflite import pre_rewrites

    model = _bert_like()
    onnx.checker.check_model(model, full_check=True)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    counts = pre_rewrites(rewritten)
    assert counts["erf_gelus_as_gelu"] == 2 and counts["bool_wheres_as_arithmetic"] == 1
    assert counts["constant_first_adds_swapped"] == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Erf" not in ops and "Where" not in ops and ops.count("Gelu") == 2
    add = next(n for n in rewritten.graph.node if n.name == "query/Add")
    assert list(add.input) == ["mm", "bias"]
    rng = np.random.default_rng(1)
    for mask in ([[1, 1, 1, 1, 0, 0]], [[1, 1, 1, 1, 1, 1]]):
        feeds = {"x": rng.standard_normal((1, 6, 16)).astype(np.float32), "mask": np.array(mask, np.int64)}
        want, got = builders.run_ort(model, feeds)[0], builders.run_ort(rewritten, feeds)[0]
        # the same function: exp(finfo.min - max) is 0 in both, the GELU differs by float rounding only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert (got[..., 4:] == 0).all() if mask[0][4] == 0 else (got > 0).all()
    # a Where on an infinite constant is left alone: 0 * inf would be NaN
    infinite = _bert_like()
    next(t for t in infinite.graph.initializer if t.name == "low").CopyFrom(
        numpy_helper.from_array(np.array(-np.inf, np.float32), "low"))
    assert pre_rewrites(infinite)["bool_wheres_as_arithmetic"] == 0
    assert "Where" in [n.op_type for n in infinite.graph.node]
    assert pre_rewrites(builders.mlp())["erf_gelus_as_gelu"] == 0


def test_shape_computations_become_the_constants_the_fixed_shapes_make_them():
    """A transformers export computes its heads' Reshape target from Shape: with the input's shape
    fixed (the file takes one sample's), it is a constant, its -1 written out."""
    from worker.pipeline.export.tflite_rewrites import shape_computations_folded

    node = helper.make_node
    nodes = [node("Shape", ["x"], ["shape"], name="shape"),
             node("Gather", ["shape", "zero_i"], ["batch"], name="batch", axis=0),
             node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="batch1"),
             node("Concat", ["batch1", "heads"], ["target"], name="target", axis=0),
             node("Reshape", ["x", "target"], ["split"], name="split"),
             node("Transpose", ["split"], ["y"], name="heads_first", perm=[0, 2, 1, 3])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([6, -1, 4], np.int64), "heads")]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 16])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 4])], inits)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 6, 16)).astype(np.float32)}
    want = builders.run_ort(model, feeds)[0]
    assert shape_computations_folded(model, feeds) == 1
    assert [n.op_type for n in model.graph.node] == ["Reshape", "Transpose"]
    reshape = model.graph.node[0]
    assert numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == reshape.input[1])).tolist() == [1, 6, 4, 4]
    np.testing.assert_array_equal(builders.run_ort(model, feeds)[0], want)


def test_litert_outputs_are_read_in_the_onnx_models_order():
    """onnx2tf's signature names the outputs ``output_<i>`` after the ONNX index while the
    interpreter lists them in its own order (silero-vad's state came first)."""
    from worker.pipeline.export.tflite import ordered_outputs

    class Interpreter:
        def __init__(self, signature):
            self.signature = signature

        def get_output_details(self):
            return [{"name": "PartitionedCall:1", "index": 84}, {"name": "PartitionedCall:0", "index": 81}]

        def _get_full_signature_list(self):
            return {"serving_default": {"outputs": self.signature}}

    ordered = ordered_outputs(Interpreter({"output_0": 81, "output_1": 84}))
    assert [d["index"] for d in ordered] == [81, 84]
    # a signature that does not name every output by its index: the interpreter's order stands
    assert [d["index"] for d in ordered_outputs(Interpreter({"probs": 81, "state": 84}))] == [84, 81]


def test_the_converters_reason_is_its_error_not_tensorflows_log_lines():
    from worker.pipeline.export.tflite import _last_error

    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: tensor 'lstm' is not int8\n"
              "I0000 00:00:1796603208.061367   23700 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
    assert _last_error(stderr) == "RuntimeError: tensor 'lstm' is not int8"
    assert _last_error("W0000 00:00:1.0 1 x.cc:1] noise\nsegmentation fault\n") == "segmentation fault"
    # onnx2tf imports a module per op: a missing one means the op has no translation
    assert _last_error("ModuleNotFoundError: No module named 'onnx2tf.ops.Loop'\n") == "onnx2tf has no translation for Loop"


def test_what_only_a_loop_body_reads_survives_the_rewrites():
    # an EmbeddingBag's table and Slice bounds, read only inside its Loop, were dropped as unread:
    # the converter then saw an invalid graph in place of its real reason (it translates no Loop)
    from worker.pipeline.export.float_graph import float_graph
    from worker.pipeline.export.tflite_rewrites import shape_computations_folded

    model = builders.bag_in_loop()
    feeds = {"ids": np.random.default_rng(0).integers(0, 200, (5, 4)).astype(np.int64)}
    plain, _ = float_graph(model)
    shape_computations_folded(plain, feeds)
    assert {t.name for t in plain.graph.initializer} >= {"table", "W"}
    np.testing.assert_allclose(builders.run_ort(plain, feeds)[0], builders.run_ort(model, feeds)[0], rtol=1e-5)
