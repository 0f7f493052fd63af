"""cleanup: BatchNorm folding, no-op removal, constant folding, dead code, merging, MatMul+Add fusion."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.step import StepContext
from worker.pipeline.steps import cleanup

from .structure_models import mlp_fp16, assert_valid_same_io, attention, cnn, inputs_for, mlp, run_model


def _params(**fields):
    return parse_recipe({"steps": [{"op": "cleanup", **fields}]}).steps[0]


def _ops(model):
    return [node.op_type for node in model.graph.node]


def _messy() -> onnx.ModelProto:
    """The CNN plus what exporters leave behind: a Constant, a no-op Cast, a Cast round trip, a
    Reshape chain, a duplicated and an unused initializer, a dead branch, an Identity on the output."""
    model = cnn()
    graph = model.graph
    rng = np.random.default_rng(9)
    fc_w = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "fc_w"))
    graph.initializer.extend([numpy_helper.from_array(fc_w.copy(), "fc_w_copy"),
                              numpy_helper.from_array(rng.standard_normal(100).astype(np.float32), "unused"),
                              numpy_helper.from_array(np.array([2, -1], np.int64), "shape_a"),
                              numpy_helper.from_array(np.array([-1, 32], np.int64), "shape_b")])
    for node in graph.node:
        if node.name == "flatten":
            node.output[0] = "f0"
        if node.name == "fc":
            node.output[0] = "y_fc"
    graph.node.extend([
        helper.make_node("Cast", ["f0"], ["f1"], name="noop_cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["f1"], ["f2"], name="widen", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["f2"], ["f3"], name="narrow", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f3", "shape_a"], ["f4"], name="reshape_a"),
        helper.make_node("Reshape", ["f4", "shape_b"], ["f"], name="reshape_b"),
        helper.make_node("Constant", [], ["two"], name="const_two", value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Constant", [], ["half"], name="const_half", value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["two", "half"], ["one"], name="fold_me"),
        helper.make_node("Mul", ["y_fc", "one"], ["y_scaled"], name="times_one"),
        helper.make_node("Gemm", ["f", "fc_w_copy"], ["dead"], name="dead_branch", transB=1),
        helper.make_node("Identity", ["y_scaled"], ["y"], name="out_identity"),
    ])
    for index, node in enumerate(list(graph.node)):
        if node.name == "fc":
            graph.node.remove(node)
            graph.node.append(node)
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(model)
    from worker.pipeline.graph import sort_graph
    sort_graph(sorted_model)
    onnx.checker.check_model(sorted_model, full_check=True)
    return sorted_model


def test_cleanup_preserves_outputs_and_removes_clutter():
    model = _messy()
    feeds = inputs_for(model, count=4)
    result = cleanup.run(model, _params(), StepContext(original=model))
    got = assert_valid_same_io(result.model, model, feeds)[0]
    np.testing.assert_allclose(got, run_model(model, feeds)[0], rtol=1e-4, atol=1e-5)
    ops = _ops(result.model)
    for gone in ("BatchNormalization", "Dropout", "Identity", "Cast", "Constant"):
        assert gone not in ops, gone
    assert ops.count("Reshape") == 1 and ops.count("Gemm") == 1 and ops.count("Conv") == 4
    names = {t.name for t in result.model.graph.initializer}
    assert "unused" not in names and "fc_w_copy" not in names and "shape_a" not in names
    metrics = result.metrics
    assert metrics["batchnorms_folded"] == 3 and metrics["constants_folded"] >= 1
    assert metrics["nodes_after"] < metrics["nodes_before"]


def test_folded_batchnorm_weights_are_the_closed_form():
    model = cnn()
    result = cleanup.run(model, _params(), StepContext(original=model))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    s = inits["bn2_scale"] / np.sqrt(inits["bn2_var"] + 1e-5)
    np.testing.assert_allclose(new[conv2.input[1]], inits["conv2_w"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(new[conv2.input[2]], inits["bn2_bias"] - s * inits["bn2_mean"], rtol=1e-5, atol=1e-7)


def test_matmul_add_fused_into_gemm_for_rank_two_only():
    model = mlp()
    result = cleanup.run(model, _params(), StepContext(original=model))
    feeds = inputs_for(model)
    np.testing.assert_allclose(assert_valid_same_io(result.model, model, feeds)[0], run_model(model, feeds)[0],
                               rtol=1e-5, atol=1e-6)
    assert _ops(result.model) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    kept = cleanup.run(model, _params(fuse_matmul_add=False), StepContext(original=model))
    assert "MatMul" in _ops(kept.model)
    block = attention()
    result = cleanup.run(block, _params(), StepContext(original=block))
    assert "Gemm" not in _ops(result.model)           # rank-3 activations: left as MatMul + Add
    feeds = inputs_for(block)
    np.testing.assert_allclose(assert_valid_same_io(result.model, block, feeds)[0], run_model(block, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_identity_between_input_and_output_is_kept():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = cleanup.run(model, _params(), StepContext(original=model))
    assert _ops(result.model) == ["Identity"]
    onnx.checker.check_model(result.model, full_check=True)


def test_dequantize_is_not_folded_back_to_float():
    """Folding must never grow the file: a DequantizeLinear of int8 weights stays."""
    q = numpy_helper.from_array(np.arange(-64, 64, dtype=np.int8).reshape(8, 16), "wq")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 16])], [q, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = cleanup.run(model, _params(), StepContext(original=model))
    assert _ops(result.model) == ["DequantizeLinear", "MatMul"]


def test_unknown_field_refused_with_path():
    with pytest.raises(RecipeError) as info:
        _params(fold=True)
    assert info.value.errors[0]["loc"] == ["steps", 0, "fold"]


def test_float16_weights_keep_their_dtype():
    model = mlp_fp16()
    result = cleanup.run(model, parse_recipe({"steps": [{"op": "cleanup", **{}}]}).steps[0], StepContext(original=model))
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)}
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert got.dtype == np.float16
    assert {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)} == {10}


def _trained_norms(beta1: float) -> onnx.ModelProto:
    """The encoder block with LayerNorm scales and biases away from 1 and 0 (as training leaves
    them); ``beta1``: the size of ln1's bias, whose readers (q, k, v) have no bias to take it."""
    model = attention()
    rng = np.random.default_rng(5)
    for tensor in model.graph.initializer:
        values = {"ln1_g": 1 + 0.3 * rng.standard_normal(32), "ln2_g": 1 + 0.3 * rng.standard_normal(32),
                  "ln1_b": beta1 * rng.standard_normal(32), "ln2_b": 0.2 * rng.standard_normal(32)}
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name].astype(np.float32), tensor.name))
    return model


def test_layernorm_scale_and_bias_fold_into_the_layers_it_feeds():
    model = _trained_norms(beta1=0.0)
    feeds = inputs_for(model, count=4)
    result = cleanup.run(model, _params(), StepContext(original=model))
    got = assert_valid_same_io(result.model, model, feeds)[0]
    np.testing.assert_allclose(got, run_model(model, feeds)[0], rtol=1e-4, atol=1e-5)
    assert result.metrics["layernorms_folded"] == 2
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for ln in (n for n in result.model.graph.node if n.op_type == "LayerNormalization"):
        assert len(ln.input) == 2 and np.array_equal(inits[ln.input[1]], np.ones(32, np.float32))
    nodes = {n.name: n for n in result.model.graph.node}
    # the closed form: W' = gamma[:, None] W, b' = b + beta W
    np.testing.assert_allclose(inits[nodes["proj_q"].input[1]], old["ln1_g"][:, None] * old["wq"], rtol=1e-6)
    up_bias = next(i for i in nodes["ffn_up_bias"].input if i in inits)
    np.testing.assert_allclose(inits[up_bias], old["b_up"] + old["ln2_b"] @ old["w_up"], rtol=1e-5, atol=1e-6)
    again = cleanup.run(result.model, _params(), StepContext(original=result.model))
    assert again.metrics["layernorms_folded"] == 0          # nothing left to fold


def test_layernorm_bias_with_no_bias_to_join_is_left_in_place():
    model = _trained_norms(beta1=0.2)                        # q, k, v: MatMul with no Add after
    result = cleanup.run(model, _params(), StepContext(original=model))
    assert result.metrics["layernorms_folded"] == 1          # ln2 only
    ln1 = next(n for n in result.model.graph.node if n.name == "ln1")
    assert list(ln1.input) == ["x", "ln1_g", "ln1_b"]
    feeds = inputs_for(model, count=4)
    np.testing.assert_allclose(assert_valid_same_io(result.model, model, feeds)[0], run_model(model, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_layernorm_is_not_folded_into_a_weight_other_nodes_read():
    # a tied weight: folding would need a second copy of it in the file
    model = _trained_norms(beta1=0.0)
    for node in model.graph.node:
        if node.name == "proj_k":
            node.input[1] = "wq"
    result = cleanup.run(model, _params(), StepContext(original=model))
    assert result.metrics["layernorms_folded"] == 1          # ln2 only
    assert sum(t.dims == [32, 32] for t in result.model.graph.initializer) == \
        sum(t.dims == [32, 32] for t in model.graph.initializer if t.name != "wk")


def test_a_constant_fold_never_stores_a_weight_twice():
    # a tied table read by a Gather and, transposed, by the output MatMul: folding the Transpose kept
    # the table for the Gather and added its transposed copy (a GPT-2 came out 0.81x its size)
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((100, 16)).astype(np.float32), "wte")
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["wte"], ["wte_t"], name="tied_t"),
             helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 100])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = sum(t.ByteSize() for t in model.graph.initializer)
    result = cleanup.run(model, _params(), StepContext(original=model))
    assert sum(t.ByteSize() for t in result.model.graph.initializer) <= before
    assert "Transpose" in _ops(result.model)
    feeds = {"ids": np.array([0, 5, 99], np.int64)}
    np.testing.assert_allclose(run_model(result.model, feeds)[0], run_model(model, feeds)[0], rtol=1e-6)
