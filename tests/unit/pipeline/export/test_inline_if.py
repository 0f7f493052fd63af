"""Shape-decided If nodes inlined for the fixed-shape converters, and the ops silero-vad needs in
the ONNX-to-PyTorch interpreter (LSTM, reflect Pad, Size, a backwards Slice), each against ONNX
Runtime on a model built here."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from worker.pipeline.distill.torch_graph import TorchGraph, unsupported_ops
from worker.pipeline.export.inline_if import inline_constant_ifs


def _branch(name: str, nodes, output: str, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                             list(inits))


def _rank_if_model() -> onnx.ModelProto:
    """silero-vad's pattern: ``if rank(x) == 3: squeeze axis 1 else x`` then a nested If on the
    last dim's size (taken branch: scale by 2 with a branch initializer of a name the main graph
    also uses), then ``* w``; the condition reads only shapes."""
    inner = helper.make_node("If", ["wide"], ["scaled"], name="inner_if",
                             then_branch=_branch("wide_then", [helper.make_node("Mul", ["y", "w"], ["t"], name="m2")], "t",
                                                 [numpy_helper.from_array(np.array(2.0, np.float32), "w")]),
                             else_branch=_branch("wide_else", [helper.make_node("Neg", ["y"], ["e"], name="neg")], "e"))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Size", ["shape"], ["rank"], name="rank"),
        helper.make_node("Equal", ["rank", "three"], ["is3"], name="is3"),
        helper.make_node("If", ["is3"], ["y"], name="outer_if",
                         then_branch=_branch("then", [helper.make_node("Squeeze", ["x", "one"], ["sq"], name="sq")], "sq"),
                         else_branch=_branch("else", [helper.make_node("Identity", ["x"], ["id"], name="id")], "id")),
        helper.make_node("Shape", ["y"], ["yshape"], name="yshape"),
        helper.make_node("Gather", ["yshape", "minus_one"], ["last"], name="last", axis=0),
        helper.make_node("Greater", ["last", "four"], ["wide"], name="wide"),
        inner,
        helper.make_node("Mul", ["scaled", "w"], ["out"], name="final"),
    ]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "three"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(-1, np.int64), "minus_one"), numpy_helper.from_array(np.array(4, np.int64), "four"),
             numpy_helper.from_array(np.array([1.0, -1.0, 0.5, 3.0, 2.0, 1.0], np.float32), "w")]
    # x of unknown rank, as silero's exports declare none: built without the full check (which
    # wants every graph input's shape)
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", builders.OPSET)])
    model.ir_version = 8
    return model


def test_an_if_decided_by_shapes_becomes_its_taken_branch_with_the_same_outputs():
    model = _rank_if_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 1, 6)).astype(np.float32)}
    want = builders.run_ort(model, feeds)[0]
    assert inline_constant_ifs(model, feeds) == 2           # the outer, then the nested one
    assert not [n for n in model.graph.node if n.op_type == "If"]
    assert {n.name for n in model.graph.node} >= {"sq", "m2"} and "neg" not in {n.name for n in model.graph.node}
    np.testing.assert_array_equal(builders.run_ort(model, feeds)[0], want)
    np.testing.assert_array_equal(want, feeds["x"][:, 0] * 2.0 * np.array([1, -1, .5, 3, 2, 1], np.float32))
    # the interpreter runs the flat graph (it has no control flow)
    assert not unsupported_ops(model)
    got = TorchGraph(model, [])({"x": torch.from_numpy(feeds["x"])})["out"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_an_if_on_an_input_value_is_refused_naming_it():
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["y"], name="by_rate",
                              then_branch=_branch("a", [helper.make_node("Identity", ["x"], ["a"], name="a")], "a"),
                              else_branch=_branch("b", [helper.make_node("Neg", ["x"], ["b"], name="b")], "b"))]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                    helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                            [numpy_helper.from_array(np.array(16000, np.int64), "rate")])
    with pytest.raises(ValueError, match="by_rate.*values of input sr"):
        inline_constant_ifs(model, {"x": np.ones((1, 4), np.float32), "sr": np.array(16000, np.int64)})


def test_the_interpreter_runs_lstm_reflect_pad_size_and_backwards_slice_as_onnx_runtime_does():
    rng = np.random.default_rng(0)
    hidden, width = 8, 5
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad", mode="reflect"),
        helper.make_node("Slice", ["padded", "starts", "ends", "axes", "steps"], ["reversed"], name="rev"),
        helper.make_node("Reshape", ["reversed", "seq_shape"], ["seq"], name="as_seq"),
        helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], name="lstm",
                         hidden_size=hidden),
        helper.make_node("Size", ["Y"], ["count"], name="size"),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT, name="count_f"),
        helper.make_node("Div", ["Y_c", "count_f"], ["c_scaled"], name="scaled"),
    ]
    inits = [numpy_helper.from_array(np.array([0, 2, 0, 3], np.int64), "pads"),
             numpy_helper.from_array(np.array([-1], np.int64), "starts"),
             numpy_helper.from_array(np.array([np.iinfo(np.int64).min], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "steps"),
             numpy_helper.from_array(np.array([9, 1, width], np.int64), "seq_shape"),
             numpy_helper.from_array((0.3 * rng.standard_normal((1, 4 * hidden, width))).astype(np.float32), "W"),
             numpy_helper.from_array((0.3 * rng.standard_normal((1, 4 * hidden, hidden))).astype(np.float32), "R"),
             numpy_helper.from_array((0.1 * rng.standard_normal((1, 8 * hidden))).astype(np.float32), "B")]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 10]),
                                    helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, hidden]),
                                    helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, hidden])],
                            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [9, 1, 1, hidden]),
                             helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 1, hidden]),
                             helper.make_tensor_value_info("c_scaled", TensorProto.FLOAT, [1, 1, hidden])], inits)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": rng.standard_normal((3, 10)).astype(np.float32),
             "h0": rng.standard_normal((1, 1, hidden)).astype(np.float32),
             "c0": rng.standard_normal((1, 1, hidden)).astype(np.float32)}
    assert not unsupported_ops(model)
    want = builders.run_ort(model, feeds)
    got = TorchGraph(model, [])({name: torch.from_numpy(value) for name, value in feeds.items()})
    for name, expected in zip(("Y", "Y_h", "c_scaled"), want):
        assert got[name].shape == expected.shape
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-5, atol=1e-6)
