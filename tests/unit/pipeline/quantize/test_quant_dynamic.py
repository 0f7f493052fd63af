"""Dynamic int8 on small models built here: MatMul / Gemm become DynamicQuantizeMatMul with int8
weights bit-exact to the contract's formula, outputs close to float in ONNX Runtime, I/O unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline import graph
from worker.pipeline.quantize.dynamic import check, quantize_dynamic
from worker.pipeline.step import StepContext


def _params(**overrides) -> QuantizeStep:
    fields = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}, "min_params": 0}
    fields.update(overrides)
    return QuantizeStep(**fields)


def _run(model, **overrides):
    ctx = StepContext(original=model)
    result = quantize_dynamic(model, _params(**overrides), ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result, ctx


_io = builders.io_of


def _values(model, node) -> np.ndarray:
    """B's symmetric int8 values, whichever storage the CPU got (int8, or uint8 with zero point 128
    where ORT's u8s8 kernel would saturate: see quantize/int8_storage.py)."""
    stored, zero = graph.get_array(model, node.input[1]), graph.get_array(model, node.input[3])
    assert (stored.dtype, int(np.max(zero)), int(np.min(zero))) in ((np.int8, 0, 0), (np.uint8, 128, 128))
    return stored.astype(np.int32) - zero.astype(np.int32)


def _fused(model, name):
    return next(n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul" and n.name == name)


def test_mlp_becomes_fused_integer_matmuls_with_bit_exact_weights():
    model = builders.mlp()
    result, ctx = _run(model)
    quantized = result.model
    assert _io(quantized) == _io(model)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2 and "MatMul" not in ops
    assert "Add" not in ops                           # the bias Adds went into the fused ops
    for node_name, weight_name, bias_name in (("fc1", "W1", "b1"), ("fc2", "W2", "b2")):
        node = _fused(quantized, node_name)
        weight = graph.get_array(model, weight_name)
        expected_scale = (np.abs(weight).max(axis=0) / np.float32(127)).astype(np.float32)
        expected_q = np.clip(np.rint(weight / expected_scale), -128, 127).astype(np.int8)
        np.testing.assert_array_equal(_values(quantized, node), expected_q)
        np.testing.assert_array_equal(graph.get_array(quantized, node.input[2]), expected_scale)
        assert node.input[4] == bias_name
        assert ctx.layers[weight_name].bits == 8 and ctx.layers[weight_name].grid["axis"] == 1
    evaluation = builders.random_inputs(model, count=64, seed=2)
    reference = builders.run_ort(model, evaluation)
    # int8 weights per channel and per-call uint8 activations: ~1% relative L2; 3% is the bound.
    assert builders.rel_l2(reference, builders.run_ort(quantized, evaluation)) < 0.03
    for count in (1, 5):
        assert builders.run_ort(quantized, builders.random_inputs(model, count=count))[0].shape == (count, 16)


def test_gemm_transposed_weight_is_stored_k_by_n_with_per_output_scales():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 40)).astype(np.float32)     # [N, K], transB=1
    bias = rng.standard_normal(24).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
                               [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result, ctx = _run(model)
    node = _fused(result.model, "fc")
    expected_scale = (np.abs(weight).max(axis=1) / np.float32(127)).astype(np.float32)
    expected_q = np.clip(np.rint(weight / expected_scale[:, None]), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(_values(result.model, node), expected_q.T)
    assert ctx.layers["W"].grid["axis"] == 0
    x = {"x": rng.standard_normal((32, 40)).astype(np.float32)}
    assert builders.rel_l2(builders.run_ort(model, x), builders.run_ort(result.model, x)) < 0.03


def test_attention_block_and_shared_weights():
    model = builders.attention()
    result, _ = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    # q, k, v read the same x: quantized once (shared_quantization), then three integer matmuls; o alone
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("MatMulIntegerToFloat") == 3
    assert ops.count("DynamicQuantizeLinear") == 1
    assert ops.count("MatMul") == 2                            # activation x activation stays float
    assert "Softmax" in ops and "LayerNormalization" in ops
    evaluation = builders.random_inputs(model, count=16, seed=2)
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.03

    shared = builders.shared_weight()
    result, ctx = _run(shared)
    readers = [n for n in result.model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(readers) == 2 and readers[0].input[1] == readers[1].input[1]   # one int8 copy
    assert "W" not in {t.name for t in result.model.graph.initializer}
    assert list(ctx.layers) == ["W"]


def test_per_tensor_weights_when_asked():
    model = builders.mlp()
    result, ctx = _run(model, weights={"bits": 8, "granularity": "tensor"})
    node = _fused(result.model, "fc1")
    assert graph.get_array(result.model, node.input[2]).shape == ()
    assert ctx.layers["W1"].grid["axis"] is None


def test_refusals_name_the_field():
    model = builders.mlp()
    with pytest.raises(RecipeError) as nothing:
        check(model, _params(include=["nothing*"]), StepContext(original=model))
    assert nothing.value.errors[0]["loc"] == ["include"]
    with pytest.raises(RecipeError) as asymmetric:
        check(model, _params(weights={"bits": 8, "symmetric": False}), StepContext(original=model))
    assert asymmetric.value.errors[0]["loc"] == ["weights", "symmetric"]
    cnn = builders.cnn_bn()
    with pytest.raises(RecipeError):      # its only MatMul / Gemm weight is 320 elements
        check(cnn, _params(min_params=1024), StepContext(original=cnn))


def test_embedding_table_is_quantized_per_row():
    model = builders.embedding_gru()
    result, ctx = _run(model)
    assert "embedding" not in {t.name for t in result.model.graph.initializer}
    assert ctx.layers["embedding"].bits == 8 and result.metrics["quantized_embeddings"] == 1
    ids = {"ids": np.random.default_rng(1).integers(0, 256, (32, 6)).astype(np.int64)}
    assert builders.rel_l2(builders.run_ort(model, ids), builders.run_ort(result.model, ids)) < 0.03


def test_weight_also_read_inside_an_if_subgraph_keeps_its_float_copy():
    from tests.unit.pipeline.quantize.test_quant_static import if_subgraph_model

    model = if_subgraph_model()
    result, _ = _run(model)
    assert "W" in {t.name for t in result.model.graph.initializer}       # the subgraph still reads it
    assert [n.op_type for n in result.model.graph.node].count("DynamicQuantizeMatMul") == 1
    x = builders.random_inputs(model, count=16)
    assert builders.rel_l2(builders.run_ort(model, x), builders.run_ort(result.model, x)) < 0.03


@pytest.mark.parametrize("storage", ["int8", "uint8"])
def test_forced_weight_storage_keeps_the_same_grid(storage):
    model = builders.mlp()
    ctx = StepContext(original=model, options={"integer_weights": storage})
    result = quantize_dynamic(model, _params(), ctx)
    node = _fused(result.model, "fc1")
    assert graph.get_array(result.model, node.input[1]).dtype == np.dtype(storage)
    weight = graph.get_array(model, "W1")
    scale = (np.abs(weight).max(axis=0) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_equal(_values(result.model, node), np.clip(np.rint(weight / scale), -128, 127))
    assert ctx.layers["W1"].extra["weight_storage"].startswith(storage)
    if storage == "uint8":     # u8u8 accumulates exactly on every x86 CPU: int8-grid error only
        evaluation = builders.random_inputs(model, count=64, seed=2)
        assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.03


def test_recipe_field_integer_weights_picks_the_storage():
    model = builders.mlp()
    for storage in ("int8", "uint8"):
        ctx = StepContext(original=model)
        result = quantize_dynamic(model, _params(integer_weights=storage), ctx)
        assert graph.get_array(result.model, _fused(result.model, "fc1").input[1]).dtype == np.dtype(storage)
    with pytest.raises(Exception, match="integer_weights"):
        _params(integer_weights="int4")


def test_conv_weights_are_stored_int8_and_computed_in_float():
    # CNN with BatchNorm: the Gemm goes dynamic; each Conv reads DequantizeLinear(int8 per output
    # channel) in float, so the file shrinks while the Conv keeps ORT's float kernel
    model = builders.cnn_bn()
    result, ctx = _run(model)
    quantized = result.model
    assert _io(quantized) == _io(model) and result.metrics["conv_weights_int8"] == 2
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("Conv") == 2 and "ConvInteger" not in ops
    dequantize = {n.output[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    for name in ("conv1.W", "conv2.W"):
        node = dequantize[name]
        assert graph.attribute(node, "axis", 1) == 0
        weight = graph.get_array(model, name)
        scale = (np.abs(weight).max(axis=(1, 2, 3)) / np.float32(127)).astype(np.float32)
        q = np.clip(np.rint(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
        np.testing.assert_array_equal(graph.get_array(quantized, node.input[0]), q)
        np.testing.assert_array_equal(graph.get_array(quantized, node.input[1]), scale)
        record = ctx.layers[name]
        assert record.bits == 8 and record.grid["axis"] == 0 and "float" in record.extra["activations"]
        assert record.extra["sqnr_db"] > 30
    assert not any(t.name in ("conv1.W", "conv2.W") for t in quantized.graph.initializer)
    assert quantized.ByteSize() < 0.45 * model.ByteSize()
    evaluation = builders.random_inputs(model, count=32, seed=4)
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(quantized, evaluation)) < 0.03
    # an excluded Conv weight stays float; below opset 13 (no per-axis DequantizeLinear) all do
    kept, _ = _run(model, exclude=["conv2*"])
    assert any(t.name == "conv2.W" and t.data_type == TensorProto.FLOAT for t in kept.model.graph.initializer)
    old = builders.cnn_bn()
    old.opset_import[0].version = 12
    assert _run(old)[0].metrics["conv_weights_int8"] == 0


def _gemm(alpha: float) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", alpha=alpha)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
                          [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W"),
                           numpy_helper.from_array(np.zeros(32, np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model, says", [("cnn", "only Conv weights"),
                                         ("gemm", "none of the 1 selected is: W (Gemm [64, 32])")])
def test_a_selection_dynamic_int8_cannot_take_says_why(model, says):
    # both were refused as "no 2-D MatMul / Gemm weight has 1024 or more elements"; the CNN's only
    # MatMul (10 x 32) is under min_params, its second Conv is not
    built = builders.cnn_bn() if model == "cnn" else _gemm(alpha=2.0)
    with pytest.raises(RecipeError) as info:
        check(built, _params(min_params=1024 if model == "cnn" else 0), StepContext(original=built))
    assert info.value.errors[0]["loc"] == ["activations", "calibration"]
    assert says in info.value.errors[0]["msg"]
