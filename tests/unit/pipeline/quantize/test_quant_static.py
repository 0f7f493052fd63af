"""Static int8 QDQ on small models built here: weights bit-exact to the contract's formula, outputs
close to float in ONNX Runtime within stated bounds, I/O unchanged, Softmax / masks kept float,
opset 12 upgraded, bias correction, refusals before work."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import InvalidInput, RecipeError
from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline import graph
from worker.pipeline.quantize import pair_saturation
from worker.pipeline.quantize.static import check, quantize_static
from worker.pipeline.step import StepContext

FLOAT_MIN = float(np.finfo(np.float32).min)


def _params(**overrides) -> QuantizeStep:
    # min_products 0: the small convs built here would otherwise keep float activations
    # (weight_only_compute); these tests are about the integer path
    fields = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}, "min_params": 0,
              "min_products": 0}
    fields.update(overrides)
    return QuantizeStep(**fields)


def _run(model, calibration, **overrides):
    ctx = StepContext(original=model, calibration=calibration)
    result = quantize_static(model, _params(**overrides), ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result, ctx

def _bias_corrected(model, calibration):
    """(the run with bias correction, its mean output error, the mean output error without): the
    error is the per-output-channel mean shift against the float model, averaged."""
    reference = builders.run_ort(model, calibration)[0]

    def mean_error(result):
        return np.abs((builders.run_ort(result.model, calibration)[0] - reference).mean(axis=0)).mean()

    plain, _ = _run(model, calibration, bias_correction=False)
    corrected, _ = _run(model, calibration, bias_correction=True)
    return corrected, mean_error(corrected), mean_error(plain)



_io = builders.io_of


def _ops(model):
    return [node.op_type for node in model.graph.node]


def _quantized_weight(model, name):
    """(int8 array, scale, zero point, axis) behind the DequantizeLinear that produces ``name``."""
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
    axis = graph.attribute(node, "axis", None)
    return (graph.get_array(model, node.input[0]), graph.get_array(model, node.input[1]),
            graph.get_array(model, node.input[2]) if len(node.input) > 2 else np.zeros((), np.int8), axis)


def test_mlp_weights_bit_exact_outputs_close_io_unchanged():
    model = builders.mlp()
    calibration = builders.random_inputs(model, count=256, seed=1)
    result, ctx = _run(model, calibration)
    quantized = result.model
    assert _io(quantized) == _io(model)
    for name in ("W1", "W2"):
        weight = graph.get_array(model, name)
        q, scale, zero, axis = _quantized_weight(quantized, name)
        record = ctx.layers[name]
        # docs/recipes.md, symmetric per output channel (MatMul W[K, N]: axis 1): s = absmax / 127; on
        # x86 without VNNI a layer whose u8s8 pairs saturate takes the 7-bit grid, s = absmax / 63
        # (quantize/pair_saturation.py), and the record says so
        seven_bit = record.extra["weight_storage"] == pair_saturation.SEVEN_BIT_STORAGE
        qmax = 63 if seven_bit else 127
        expected_scale = (np.abs(weight).max(axis=0) / np.float32(qmax)).astype(np.float32)
        expected_q = np.clip(np.rint(weight / expected_scale), -qmax - 1, qmax).astype(np.int8)
        # int8, or uint8 + 128 (the same grid) where a layer cannot be modelled (quantize/int8_storage.py)
        assert axis == 1 and (q.dtype, int(zero.min()), int(zero.max())) in ((np.int8, 0, 0), (np.uint8, 128, 128))
        np.testing.assert_array_equal(scale, expected_scale)
        np.testing.assert_array_equal(q.astype(np.int32) - zero.astype(np.int32), expected_q)
        assert record.bits == 8 and record.grid["axis"] == 1 and record.grid["bits"] == (7 if seven_bit else 8)
        np.testing.assert_array_equal(record.grid["scale"], expected_scale)
    assert not {"W1", "W2"} & {t.name for t in quantized.graph.initializer}
    evaluation = builders.random_inputs(model, count=64, seed=2)
    reference = builders.run_ort(model, evaluation)
    # 8-bit activations and weights on a random 2-layer MLP: about 1% relative L2; 4% is the bound.
    assert builders.rel_l2(reference, builders.run_ort(quantized, evaluation)) < 0.04
    assert _ops(quantized).count("QuantizeLinear") >= 2
    assert "Relu" not in _ops(quantized)          # folded into the quantization of fc1's output
    assert result.metrics["relu_folded"] == 1


def test_dynamic_batch_axis_is_kept():
    model = builders.mlp()
    result, _ = _run(model, builders.random_inputs(model, count=64))
    for count in (1, 7):
        feeds = builders.random_inputs(model, count=count, seed=3)
        assert builders.run_ort(result.model, feeds)[0].shape == (count, 16)


def test_cnn_with_batchnorm_folds_and_fuses_into_integer_convolutions(tmp_path):
    model = builders.cnn_bn()
    calibration = {"x": np.random.default_rng(1).uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)}
    result, ctx = _run(model, calibration)
    quantized = result.model
    assert _io(quantized) == _io(model)
    assert "BatchNormalization" not in _ops(quantized)
    _, scale, _, axis = _quantized_weight(quantized, "conv2.W")
    assert axis == 0 and scale.shape == (32,)              # per output channel, for real
    inits = graph.initializers(quantized)
    bias_dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT32]
    assert len(bias_dq) >= 2                               # conv biases (from the folded BN) in int32
    for node in bias_dq:
        # s_b = s_x * s_w exactly, zero point 0
        assert not graph.get_array(quantized, node.input[2]).any()
    evaluation = {"x": np.random.default_rng(2).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)}
    reference = builders.run_ort(model, evaluation)
    assert builders.rel_l2(reference, builders.run_ort(quantized, evaluation)) < 0.05
    # ONNX Runtime turns the pattern into integer kernels
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = _ops(onnx.load(str(tmp_path / "optimized.onnx")))
    assert fused.count("QLinearConv") == 2 and "Conv" not in fused


def test_opset_12_model_is_upgraded_for_per_channel_weights():
    model = builders.mlp(opset=12)
    result, _ = _run(model, builders.random_inputs(model, count=64))
    assert graph.opset(result.model) >= 13
    assert _quantized_weight(result.model, "W1")[3] == 1
    evaluation = builders.random_inputs(model, count=32, seed=2)
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.04


def _masked_attention(d: int = 32, seq: int = 6, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, d], mask[batch, seq] (0 or float min) -> softmax(x Wq (x Wk)^T + mask) x Wv."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"{n}.W")
             for n in ("q", "k", "v")]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [
        helper.make_node("MatMul", ["x", "q.W"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "k.W"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "v.W"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Unsqueeze", ["mask", "axis1"], ["mask3"], name="mask_rows"),
        helper.make_node("Add", ["scores", "mask3"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["attention"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attention", "v"], ["y"], name="context"),
    ]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d]),
                                            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", seq])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _mask_data(count: int, seq: int = 6, d: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, seq + 1, count)
    mask = np.where(np.arange(seq)[None, :] < lengths[:, None], 0.0, FLOAT_MIN).astype(np.float32)
    return {"x": rng.standard_normal((count, seq, d)).astype(np.float32), "mask": mask}


def test_attention_keeps_softmax_and_the_masked_scores_in_float():
    model = _masked_attention()
    result, _ = _run(model, _mask_data(128))
    quantized = result.model
    assert _io(quantized) == _io(model)
    producers = graph.producers(quantized)
    softmax = next(n for n in quantized.graph.node if n.op_type == "Softmax")
    assert producers[softmax.input[0]].op_type == "Add"      # no DequantizeLinear in front of it
    readers = graph.consumers(quantized)
    assert all(node.op_type != "QuantizeLinear" for node, _ in readers["masked"])
    evaluation = _mask_data(64, seed=1)
    reference = builders.run_ort(model, evaluation)
    output = builders.run_ort(quantized, evaluation)
    assert np.isfinite(output[0]).all()
    assert builders.rel_l2(reference, output) < 0.05


def test_softmax_dropped_from_float_ops_is_quantized_but_the_mask_tensor_stays_float():
    model = _masked_attention()
    result, _ = _run(model, _mask_data(128), float_ops=[])
    quantized = result.model
    kept = result.metrics["float_activations"]
    assert "masked" in kept and "mask" in kept["masked"]      # scores + float-min mask: left in float
    readers = graph.consumers(quantized)
    assert any(node.op_type == "QuantizeLinear" for node, _ in readers["attention"])   # softmax output: quantized
    evaluation = _mask_data(64, seed=1)
    output = builders.run_ort(quantized, evaluation)
    assert builders.rel_l2(builders.run_ort(model, evaluation), output) < 0.05


def test_bias_correction_removes_the_mean_output_error_on_calibration_data():
    rng = np.random.default_rng(0)
    # A Gemm whose input is all positive: an asymmetric activation grid with few levels near the
    # data gives a systematic output shift that bias correction measures and removes.
    weight = rng.standard_normal((48, 64)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])],
                               [numpy_helper.from_array(weight, "W"),
                                numpy_helper.from_array(np.zeros(48, np.float32), "b")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = {"x": (rng.exponential(1.0, (256, 64)) + 0.3).astype(np.float32)}
    corrected, error, uncorrected = _bias_corrected(model, calibration)
    assert corrected.metrics["bias_corrected"] == 1
    assert error < 0.2 * uncorrected


def test_a_conv_bias_held_in_a_constant_node_is_corrected_and_stored_int32():
    # paddle2onnx writes every Conv bias as a Constant node: bias correction and the int32 bias
    # (which ONNX Runtime's QLinearConv fusion needs) must reach it as they reach an initializer
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 32, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["b"], name="bias_constant",
                              value=numpy_helper.from_array(np.zeros(24, np.float32), "b")),
             helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, 4, 4])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24, 4, 4])],
                               [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = {"x": (rng.exponential(1.0, (128, 32, 4, 4)) + 0.3).astype(np.float32)}
    corrected, error, uncorrected = _bias_corrected(model, calibration)
    assert corrected.metrics["bias_corrected"] == 1 and corrected.metrics["int32_biases"] == 1
    assert error < 0.2 * uncorrected


def test_shared_weight_is_quantized_once_and_read_by_both_layers():
    model = builders.shared_weight()
    result, ctx = _run(model, builders.random_inputs(model, count=64))
    readers = graph.consumers(result.model)
    assert {node.name for node, _ in readers["W"]} == {"first", "second"}
    assert list(ctx.layers) == ["W"]
    evaluation = builders.random_inputs(model, count=32, seed=2)
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.05


def test_symmetric_activations_use_int8_with_zero_point_zero():
    model = builders.mlp()
    result, _ = _run(model, builders.random_inputs(model, count=64), activations={"calibration": "minmax", "symmetric": True})
    for node in result.model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero = graph.get_array(result.model, node.input[2])
            assert zero.dtype == np.int8 and zero.shape == () and zero == 0
            assert graph.get_array(result.model, node.input[1]).shape == ()     # per tensor: a scalar
    assert result.metrics["activation_dtype"] == "int8"


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_methods_run_end_to_end(method):
    model = builders.cnn_bn()
    calibration = {"x": np.random.default_rng(1).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)}
    result, _ = _run(model, calibration, activations={"calibration": method})
    assert result.metrics["calibration"] == method
    evaluation = {"x": np.random.default_rng(2).uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)}
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.08


def test_refusals_name_the_field_before_any_work():
    model = builders.mlp()
    params = _params()
    with pytest.raises(RecipeError) as missing:
        check(model, params, StepContext(original=model, calibration=None))
    assert missing.value.errors[0]["loc"] == ["activations", "calibration"]
    wrong_shape = {"x": np.zeros((8, 5), np.float32)}
    with pytest.raises(RecipeError) as mismatch:
        check(model, params, StepContext(original=model, calibration=wrong_shape))
    assert mismatch.value.errors[0]["loc"] == ["calibration", "x"]
    with pytest.raises(RecipeError) as nothing:
        check(model, _params(include=["nothing*"]), StepContext(original=model, calibration={"x": np.zeros((8, 128), np.float32)}))
    assert nothing.value.errors[0]["loc"] == ["include"]
    with pytest.raises(RecipeError) as blocked:
        check(model, _params(weights={"bits": 8, "granularity": "block"}), StepContext(original=model, calibration=None))
    assert blocked.value.errors[0]["loc"] == ["weights", "granularity"]


def test_embedding_table_is_int8_per_row_and_dequantized_after_the_gather():
    model = builders.embedding_gru()
    rng = np.random.default_rng(0)
    calibration = {"ids": rng.integers(0, 256, (64, 6)).astype(np.int64)}
    result, ctx = _run(model, calibration)
    quantized = result.model
    assert _io(quantized) == _io(model)
    table = graph.get_array(model, "embedding")
    expected_scale = (np.abs(table).max(axis=1) / np.float32(127)).astype(np.float32)
    expected_q = np.clip(np.rint(table / expected_scale[:, None]), -128, 127).astype(np.int8)
    gather = next(n for n in quantized.graph.node if n.name == "embed")
    np.testing.assert_array_equal(graph.get_array(quantized, gather.input[0]), expected_q)
    assert "embedding" not in {t.name for t in quantized.graph.initializer}
    assert "DequantizeLinear" not in [graph.producers(quantized)[i].op_type for i in gather.input
                                      if i in graph.producers(quantized)]
    assert ctx.layers["embedding"].grid["axis"] == 0 and result.metrics["quantized_embeddings"] == 1
    evaluation = {"ids": rng.integers(0, 256, (32, 6)).astype(np.int64)}
    # int8 rows into a GRU, int8 head with quantized activations: 5% is the bound
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(quantized, evaluation)) < 0.05
    kept, _ = _run(model, calibration, embeddings=False)
    assert "embedding" in {t.name for t in kept.model.graph.initializer}


def test_position_table_is_int8_behind_a_dequantize_that_keeps_its_name():
    rng = np.random.default_rng(0)
    position = (rng.standard_normal((1, 16, 64)) * 0.1).astype(np.float32)
    weight = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "position"], ["h"], name="add_position"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="proj")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 64])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 32])],
                               [numpy_helper.from_array(position, "position"), numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = {"x": rng.standard_normal((64, 16, 64)).astype(np.float32)}
    result, ctx = _run(model, calibration)
    q, scale, zero, axis = _quantized_weight(result.model, "position")
    expected_scale = np.float32(np.abs(position).max() / np.float32(127))
    assert axis is None and scale == expected_scale
    np.testing.assert_array_equal(q, np.clip(np.rint(position / expected_scale), -128, 127).astype(np.int8))
    assert result.metrics["quantized_tables"] == 1 and ctx.layers["position"].bits == 8
    assert builders.rel_l2(builders.run_ort(model, calibration), builders.run_ort(result.model, calibration)) < 0.03


def if_subgraph_model(d: int = 64) -> onnx.ModelProto:
    """h = x W; y = If(cond, then: h W (W read from the outer scope), else: h)."""
    rng = np.random.default_rng(0)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["t"], name="inner")], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", d])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["e"], name="pass")], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", d])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="outer"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
                               [numpy_helper.from_array((rng.standard_normal((d, d)) / 8).astype(np.float32), "W"),
                                numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weight_also_read_inside_an_if_subgraph_stays_readable():
    model = if_subgraph_model()
    calibration = builders.random_inputs(model, count=64)
    result, _ = _run(model, calibration)
    assert builders.rel_l2(builders.run_ort(model, calibration), builders.run_ort(result.model, calibration)) < 0.05


def test_weight_owned_by_an_if_branch_is_stored_int8_and_the_branch_stays_float():
    model = if_subgraph_model()
    rng = np.random.default_rng(5)
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    then_branch.node[0].input[1] = "W_branch"           # the branch now multiplies by its own weight
    then_branch.initializer.append(numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32),
                                                           "W_branch"))
    calibration = builders.random_inputs(model, count=64)
    result, ctx = _run(model, calibration)
    _, scale, _, axis = _quantized_weight(result.model, "W_branch")
    assert axis == 1 and scale.shape == (64,)            # per output channel, like the main graph's
    assert ctx.layers["W_branch"].extra["activations"] == "weight-only int8 (inside a control-flow body)"
    assert result.metrics["quantized_body_weights"] == 1
    branches = next(n for n in result.model.graph.node if n.op_type == "If").attribute
    assert all(len(a.g.initializer) == 0 for a in branches)   # nothing float left in the branches
    assert builders.rel_l2(builders.run_ort(model, calibration), builders.run_ort(result.model, calibration)) < 0.05


def test_weights_held_in_constant_nodes_are_quantized():
    model = builders.mlp(constants=True)
    calibration = builders.random_inputs(model, count=64)
    result, ctx = _run(model, calibration)
    assert {"W1", "W2"} <= set(ctx.layers)
    assert not any(n.op_type == "Constant" and n.output[0] in ("W1", "W2") for n in result.model.graph.node)
    assert builders.rel_l2(builders.run_ort(model, calibration), builders.run_ort(result.model, calibration)) < 0.04


def test_static_and_dynamic_recipes_run_through_the_pipeline(tmp_path):
    from core.recipe import parse_recipe
    from worker.pipeline.runner import run

    model = builders.mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    calibration = builders.random_inputs(model, count=64)
    options = {"latency_runs": 2, "latency_budget_s": 1, "layer_errors": False, "fidelity_samples": 16}
    for calibration_method in ("entropy", "dynamic"):
        recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8},
                                          "activations": {"calibration": calibration_method}}]})
        result = run(path, recipe, calibration=calibration, workdir=tmp_path / calibration_method, options=options)
        compressed = onnx.load(str(tmp_path / calibration_method / "model.onnx"))
        assert _io(compressed) == _io(model)
        assert builders.rel_l2(builders.run_ort(model, calibration), builders.run_ort(compressed, calibration)) < 0.04
        assert result is not None
    with pytest.raises(InvalidInput) as refused:     # data that does not fit: refused before work
        run(path, parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8},
                                           "activations": {"calibration": "minmax"}}]}),
            calibration={"x": np.zeros((4, 3), np.float32)}, workdir=tmp_path / "bad", options=options)
    assert refused.value.errors[0]["loc"][0] == "calibration"
    assert not (tmp_path / "bad" / "model.onnx").exists()


@pytest.mark.parametrize("storage", ["int8", "uint8"])
def test_forced_weight_storage_keeps_the_contract_grid(storage):
    model = builders.mlp()
    calibration = builders.random_inputs(model, count=128, seed=1)
    ctx = StepContext(original=model, calibration=calibration, options={"integer_weights": storage})
    result = quantize_static(model, _params(), ctx)
    q, scale, zero, _ = _quantized_weight(result.model, "W1")
    weight = graph.get_array(model, "W1")
    assert q.dtype == np.dtype(storage) and int(zero.max()) == int(zero.min()) == (128 if storage == "uint8" else 0)
    np.testing.assert_array_equal(q.astype(np.int32) - zero.astype(np.int32), np.clip(np.rint(weight / scale), -128, 127))
    assert ctx.layers["W1"].extra["weight_storage"].startswith(storage)


def test_lstm_inside_an_if_gets_weight_only_int8_recurrent_weights():
    model = builders.lstm_in_if()
    calibration = {"x": np.random.default_rng(4).standard_normal((8, 5, 1, 32)).astype(np.float32)}
    result, ctx = _run(model, calibration)
    for name, rows in (("lstm_W", 256), ("lstm_R", 256)):
        q, scale, _, axis = _quantized_weight(result.model, name)
        assert q.dtype == np.int8 and axis == 1 and scale.shape == (rows,)   # one scale per gate row
        assert ctx.layers[name].extra["activations"] == "weight-only int8 (inside a control-flow body)"
    floats = [t.name for t in result.model.graph.initializer
              if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 1024]
    assert floats == []
    for sample in calibration["x"]:
        feeds = {"x": sample}
        assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(result.model, feeds)) < 0.03


def test_bias_correction_of_a_chain_removes_each_layers_shift_once():
    """Three Gemms in a row, each input positive: a correction that subtracts, at every layer, the
    whole model's accumulated shift (upstream layers' included) corrects the chain several times
    over; each layer's own shift, removed once, leaves the output's mean error far below the plain
    model's."""
    rng = np.random.default_rng(1)
    inits, nodes, source = [], [], "x"
    for index in range(3):
        weight = (np.abs(rng.standard_normal((64, 64))) / 8 + 0.02 * rng.standard_normal((64, 64))).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"W{index}"), numpy_helper.from_array(np.zeros(64, np.float32), f"b{index}")]
        nodes.append(helper.make_node("Gemm", [source, f"W{index}", f"b{index}"], [f"y{index}"], name=f"fc{index}", transB=1))
        source = f"y{index}"
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                               [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 64])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = {"x": (rng.exponential(1.0, (256, 64)) + 0.3).astype(np.float32)}
    corrected, error, uncorrected = _bias_corrected(model, calibration)
    assert corrected.metrics["bias_corrected"] == 3
    assert error < 0.05 * uncorrected   # the one-pass output form leaves 0.26


def test_int16_activations_for_chosen_tensors():
    model = builders.mlp()
    calibration = builders.random_inputs(model, count=64)
    reference = builders.run_ort(model, calibration)
    plain, _ = _run(model, calibration)
    wide, _ = _run(model, calibration, activations={"calibration": "minmax", "int16": ["*"]})
    assert graph.opset(wide.model) >= 21
    zero_points = {t.name: t.data_type for t in wide.model.graph.initializer if t.name.endswith("_zero_point")}
    activation_zero_points = [n.input[2] for n in wide.model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(zero_points[z] == TensorProto.UINT16 for z in activation_zero_points)
    assert wide.metrics["int16_activations"] and not plain.metrics["int16_activations"]
    # the same calibrated range on 65536 levels instead of 256 (int8 weights dominate what is left)
    for tensor in wide.metrics["int16_activations"]:
        scales = [graph.get_array(m.model, f"{tensor}_scale") for m in (plain, wide)]
        assert np.isclose(scales[0] / scales[1], 65535 / 255, rtol=1e-3)
    assert builders.rel_l2(reference, builders.run_ort(wide.model, calibration)) < \
        builders.rel_l2(reference, builders.run_ort(plain.model, calibration))


def test_a_model_whose_only_layers_are_inside_an_if_is_accepted_and_stored_int8():
    """silero-vad's shape: every layer inside the If on the sample rate; the step must not refuse it
    for having no main-graph Conv / MatMul / Gemm."""
    model = builders.lstm_in_if()
    model.graph.node[0].CopyFrom(helper.make_node("Identity", ["x"], ["h"], name="outer"))
    kept = [t for t in model.graph.initializer if t.name != "W"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    calibration = {"x": np.random.default_rng(4).standard_normal((4, 5, 1, 32)).astype(np.float32)}
    result, ctx = _run(model, calibration, min_params=1024)
    assert result.metrics["quantized_body_weights"] == 2
    assert {"lstm_W", "lstm_R"} <= set(ctx.layers)


def test_conv_transpose_weights_are_stored_int8_beside_the_integer_convs():
    """A U-Net's ConvTranspose (no integer kernel in ONNX Runtime's CPU provider) was left float32 and
    unlisted under static int8: its weight is int8 per output channel (axis 1 of [I, O/g, k..])
    behind a DequantizeLinear, the layer runs in float on it, and the record says 8 bits."""
    rng = np.random.default_rng(7)
    arrays = {"w1": rng.standard_normal((8, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(8) * 0.1,
              "wt": rng.standard_normal((8, 6, 2, 2)) * 0.3, "bt": rng.standard_normal(6) * 0.1,
              "w2": rng.standard_normal((4, 6, 1, 1)) * 0.3}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="down", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["t"], name="up", strides=[2, 2], kernel_shape=[2, 2]),
             helper.make_node("Relu", ["t"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="head")]
    g = helper.make_graph(nodes, "unet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calibration = builders.random_inputs(model, count=32, seed=1)
    result, ctx = _run(model, calibration)
    q, scale, zero, axis = _quantized_weight(result.model, "wt")
    assert q.dtype == np.int8 and axis == 1 and scale.shape == (6,)
    assert ctx.layers["wt"].bits == 8 and "wt" not in {t.name for t in result.model.graph.initializer}
    evaluation = builders.random_inputs(model, count=16, seed=2)
    assert builders.rel_l2(builders.run_ort(model, evaluation), builders.run_ort(result.model, evaluation)) < 0.05


def test_a_model_output_that_echoes_a_quantized_tensor_stays_exact():
    """An output no integer kernel computes (Identity of the input; the input is also a quantized
    layer's activation) read the DequantizeLinear and came back with rounding (rel_l2 0.01)."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.2).astype(np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
             helper.make_node("Identity", ["x"], ["x_echo"], name="echo")]
    g = helper.make_graph(nodes, "echo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
                           helper.make_tensor_value_info("x_echo", TensorProto.FLOAT, ["n", 32])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calibration = builders.random_inputs(model, count=32, seed=1)
    result, _ = _run(model, calibration)
    assert "QuantizeLinear" in _ops(result.model)       # the MatMul's input is still quantized
    evaluation = builders.random_inputs(model, count=8, seed=2)
    got = builders.run_ort(result.model, evaluation)
    np.testing.assert_array_equal(got[1], evaluation["x"])
