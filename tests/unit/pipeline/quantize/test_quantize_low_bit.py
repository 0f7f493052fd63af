"""Weight-only int4 / int2 (per tensor, channel, block; symmetric and asymmetric), MatMulNBits,
GPTQ, embeddings, recurrent cells and subgraph weights.

Stored integers are compared bit for bit with docs/recipes.md's formula computed here in numpy.
Output bounds in ORT are stated per test: int4 blocked ~ a few percent, int2 tens of percent.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply, dq_of, step
from worker.pipeline.step import StepContext
from worker.pipeline.steps import quantize as quantize_step


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).astype(np.float32)


def blocked(values: np.ndarray, block: int, fn) -> np.ndarray:
    """fn over blocks of ``block`` rows (axis 0), repeated back to one value per row."""
    k = values.shape[0]
    out = np.concatenate([np.repeat(fn(values[i:i + block], axis=0, keepdims=True), min(block, k - i), axis=0)
                          for i in range(0, k, block)])
    return out


@pytest.mark.parametrize("bits", [4, 2])
def test_symmetric_blocked_bit_exact(bits):
    model = builders.mlp()
    w1 = weight(model, "W1")
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": bits, "granularity": "block", "block_size": 32}, "format": "qdq"})
    node, stored = dq_of(result.model, "W1")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    q_init = next(t for t in result.model.graph.initializer if t.name == node.input[0])
    assert q_init.data_type == {4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    assert len(q_init.raw_data) == w1.size * bits // 8            # packed
    qmax = 2 ** (bits - 1) - 1
    s_rows = (blocked(np.abs(w1), 32, np.max) / np.float32(qmax)).astype(np.float32)
    np.testing.assert_array_equal(np.repeat(stored["scale"], 32, axis=0), s_rows)
    np.testing.assert_array_equal(stored["q"], np.clip(np.rint(w1 / s_rows), -qmax - 1, qmax))
    opset = [o.version for o in result.model.opset_import if o.domain == ""][0]
    assert opset >= {4: 21, 2: 25}[bits]
    error = builders.rel_l2(expected, builders.run_ort(result.model, feeds))
    assert error < {4: 0.15, 2: 0.95}[bits]     # int2 absmax keeps {-1, 0, 1} * max: coarse by design
    assert ctx.layers["W1"].bits == bits and ctx.layers["W1"].extra["format"] == "qdq"
    assert ctx.layers["W1"].extra["sqnr_db"] > {4: 15, 2: 3}[bits]


def test_int4_asymmetric_per_channel_and_per_tensor():
    model = builders.mlp()
    w2 = weight(model, "W2")
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, _ = apply(model, {"weights": {"bits": 4, "symmetric": False}})
    node, stored = dq_of(result.model, "W2")
    lo = np.minimum(w2.min(axis=0), 0).astype(np.float32)
    hi = np.maximum(w2.max(axis=0), 0).astype(np.float32)
    s = ((hi - lo) / np.float32(15)).astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, 15)
    np.testing.assert_array_equal(stored["scale"], s)
    np.testing.assert_array_equal(stored["zero_point"], z)
    np.testing.assert_array_equal(stored["q"], np.clip(np.rint(w2 / s) + z, 0, 15))
    assert next(t for t in result.model.graph.initializer if t.name == node.input[0]).data_type == TensorProto.UINT4
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.2

    result, _ = apply(builders.mlp(), {"weights": {"bits": 4, "granularity": "tensor"}})
    _, stored = dq_of(result.model, "W2")
    s = np.float32(np.abs(w2).max()) / np.float32(7)
    assert stored["scale"] == s
    np.testing.assert_array_equal(stored["q"], np.clip(np.rint(w2 / s), -8, 7))


def test_mse_scale_search_is_no_worse_than_absmax():
    base, _ = apply(builders.mlp(), {"weights": {"bits": 4, "granularity": "block"}, "format": "qdq"})
    searched, ctx = apply(builders.mlp(), {"weights": {"bits": 4, "granularity": "block", "scale_search": "mse"},
                                           "format": "qdq"})
    w1 = weight(builders.mlp(), "W1")

    def err(model):
        _, stored = dq_of(model, "W1")
        w_hat = (stored["q"] * np.repeat(stored["scale"], 32, axis=0))
        return float(np.sum((w_hat - w1) ** 2))

    assert err(searched.model) <= err(base.model)


def test_int2_with_mse_scales_is_usable():
    model = builders.mlp()
    feeds = builders.random_inputs(model)
    result, _ = apply(builders.mlp(), {"weights": {"bits": 2, "granularity": "block", "block_size": 16,
                                                   "symmetric": False, "scale_search": "mse"}, "format": "qdq"})
    # four levels with a searched clip: about 0.4 here, against 0.8 for symmetric absmax
    assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(result.model, feeds)) < 0.5


def test_matmulnbits_format_same_numbers_as_qdq():
    model = builders.mlp()
    feeds = builders.random_inputs(model)
    spec = {"weights": {"bits": 4, "granularity": "block", "block_size": 32}}
    qdq, _ = apply(builders.mlp(), {**spec, "format": "qdq"})
    nbits, ctx = apply(builders.mlp(), {**spec, "format": "matmulnbits"})
    fused = [n for n in nbits.model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in fused] == ["fc1", "fc2"] and all(n.domain == "com.microsoft" for n in fused)
    assert not any(n.op_type == "DequantizeLinear" for n in nbits.model.graph.node)
    assert nbits.metrics["formats"] == {"W1": "matmulnbits", "W2": "matmulnbits"}
    # the packed B holds q + 8 of W^T, block by block
    _, stored = dq_of(qdq.model, "W1")
    b = numpy_helper.to_array(next(t for t in nbits.model.graph.initializer if t.name == fused[0].input[1]))
    assert b.shape == (256, 128 // 32, 16)
    low, high = (b & 0x0F).astype(np.int32), (b >> 4).astype(np.int32)
    unpacked = np.stack([low, high], axis=-1).reshape(256, 128)
    np.testing.assert_array_equal(unpacked - 8, stored["q"].T)
    a = builders.run_ort(qdq.model, feeds)
    b_out = builders.run_ort(nbits.model, feeds)
    assert builders.rel_l2(a, b_out) < 0.02
    assert builders.rel_l2(builders.run_ort(model, feeds), b_out) < 0.15
    from worker.pipeline import metrics           # MACs see through the contrib op: K * N per sample
    assert metrics.macs(nbits.model) == 128 * 256 + 256 * 16 == metrics.macs(model)


def test_matmulnbits_asymmetric_and_padding():
    model = builders.mlp(inputs=80)            # K = 80: the last block of 32 is padded
    feeds = builders.random_inputs(model)
    spec = {"weights": {"bits": 4, "granularity": "block", "block_size": 32, "symmetric": False}}
    qdq, _ = apply(builders.mlp(inputs=80), {**spec, "format": "qdq"})
    nbits, _ = apply(builders.mlp(inputs=80), {**spec, "format": "matmulnbits"})
    assert builders.rel_l2(builders.run_ort(qdq.model, feeds), builders.run_ort(nbits.model, feeds)) < 0.02
    assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(nbits.model, feeds)) < 0.15


def test_auto_format_measures_each_layer_shape_and_reports():
    result, ctx = apply(builders.mlp(), {"weights": {"bits": 4, "granularity": "block"}, "format": "auto"},
                        options={"format_runs": 5, "format_budget_s": 0.5})
    timing = result.metrics["format_latency_ms"]
    assert set(timing) == {"W1", "W2"}
    for weight, measured in timing.items():
        assert set(measured) == {"qdq", "matmulnbits"}
        faster = min(measured, key=measured.get)
        assert result.metrics["formats"][weight] == faster == ctx.layers[weight].extra["format"]
    kinds = {n.op_type for n in result.model.graph.node}
    assert ("MatMulNBits" in kinds) == ("matmulnbits" in result.metrics["formats"].values())


@pytest.mark.parametrize("bits", [8, 1])
def test_per_channel_grids_take_matmulnbits_with_the_same_numbers(bits):
    model = builders.mlp()
    feeds = builders.random_inputs(model)
    spec = {"weights": {"bits": bits}}
    qdq, _ = apply(builders.mlp(), {**spec, "format": "qdq"})
    nbits, ctx = apply(builders.mlp(), {**spec, "format": "matmulnbits"})
    fused = [n for n in nbits.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 2 and {helper.get_attribute_value(a) for n in fused for a in n.attribute
                                if a.name == "bits"} == {8 if bits == 8 else 2}
    assert builders.rel_l2(builders.run_ort(qdq.model, feeds), builders.run_ort(nbits.model, feeds)) < 0.02
    assert ctx.layers["W1"].extra["format"] == "matmulnbits"


def correlated(model: onnx.ModelProto, count: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs with a strongly non-isotropic covariance (as real activations have)."""
    rng = np.random.default_rng(seed)
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    mix = np.random.default_rng(99).standard_normal((k, k)) * np.logspace(0, -2, k)[:, None]
    return {"x": (rng.standard_normal((count, k)) @ mix * 3).astype(np.float32)}


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_beats_rtn_on_held_out_data(bits):
    model = builders.mlp()
    calibration = correlated(model, 256, seed=1)
    evaluation = correlated(model, 128, seed=2)
    expected = builders.run_ort(model, evaluation)
    spec = {"weights": {"bits": bits, "granularity": "block", "block_size": 32}, "format": "qdq"}
    rtn, _ = apply(builders.mlp(), spec)
    # the contract's absmax grid (the default, said explicitly), so that the integers can be compared
    # with RTN's grid below
    gptq, ctx = apply(builders.mlp(), {**spec, "weights": {**spec["weights"], "scale_search": "absmax"},
                                       "method": "gptq"}, calibration=calibration)
    assert {r.extra["method"] for r in ctx.layers.values()} == {"gptq"}
    rtn_error = builders.rel_l2(expected, builders.run_ort(rtn.model, evaluation))
    gptq_error = builders.rel_l2(expected, builders.run_ort(gptq.model, evaluation))
    assert gptq_error <= 0.8 * rtn_error, (gptq_error, rtn_error)
    # GPTQ's integers live on the same grid RTN chose: same scales, values in range
    _, stored_rtn = dq_of(rtn.model, "W1")
    _, stored_gptq = dq_of(gptq.model, "W1")
    np.testing.assert_array_equal(stored_rtn["scale"], stored_gptq["scale"])
    qmax = 2 ** (bits - 1) - 1
    assert stored_gptq["q"].min() >= -qmax - 1 and stored_gptq["q"].max() <= qmax


def test_gptq_on_conv_and_gemm():
    model = builders.cnn_bn()
    rng = np.random.default_rng(3)
    calibration = {"x": rng.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    feeds = {"x": rng.standard_normal((32, 1, 8, 8)).astype(np.float32)}
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 4}, "method": "gptq", "min_params": 256, "format": "qdq"},
                        calibration=calibration)
    assert {name: r.extra["method"] for name, r in ctx.layers.items()} == {"conv2.W": "gptq", "fc.W": "gptq"}
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.2


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_embedding_table_quantized_per_row_and_recurrent_weights(cell):
    model = builders.embedding_gru(cell=cell)
    table = weight(model, "embedding")
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}, "min_params": 500})
    assert set(ctx.layers) == {"embedding", "gru.W", "gru.R", "head.W1", "head.W2"}
    node, stored = dq_of(result.model, "embedding")
    assert helper.get_attribute_value(node.attribute[0]) == 0           # one scale per row (token)
    s = (np.abs(table).max(axis=1) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_equal(stored["scale"], s)
    np.testing.assert_array_equal(stored["q"], np.clip(np.rint(table / s[:, None]), -128, 127))
    gru_dq, _ = dq_of(result.model, "gru.W")
    assert helper.get_attribute_value(gru_dq.attribute[0]) == 1         # per gate row
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.05
    # embeddings: false leaves the table float
    _, ctx = apply(builders.embedding_gru(), {"weights": {"bits": 8}, "embeddings": False, "min_params": 1000})
    assert "embedding" not in ctx.layers


def test_int4_attention_block():
    model = builders.attention()
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 4, "granularity": "block", "block_size": 16}, "format": "qdq"})
    assert set(ctx.layers) == {"q.W", "k.W", "v.W", "o.W"}
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.1
    for batch in (1, 3):
        assert builders.run_ort(result.model, {"x": feeds["x"][:batch]})[0].shape == (batch, 8, 64)


def _if_model(then_init: str = "W_then", else_reads_w: bool = False) -> onnx.ModelProto:
    """h = x W; y = If(cond, then: h W_then (W_then the branch's own initializer), else: h [W])."""
    rng = np.random.default_rng(0)
    w_then = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), then_init)
    branch = helper.make_graph([helper.make_node("MatMul", ["h", then_init], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], [w_then])
    other_nodes = ([helper.make_node("MatMul", ["h", "W"], ["e"], name="else_mm")] if else_reads_w
                   else [helper.make_node("Identity", ["h"], ["e"], name="else_id")])
    other = helper.make_graph(other_nodes, "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _body_float_weights(model: onnx.ModelProto) -> list[str]:
    from worker.pipeline import subgraphs
    return [t.name for body in subgraphs.all_bodies(model) for t in body.initializer
            if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]


@pytest.mark.parametrize("bits", [8, 4])
def test_if_branch_weights_are_quantized(bits):
    model = _if_model(else_reads_w=True)
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    w_then = numpy_helper.to_array(then_branch.initializer[0])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    expected = {c: builders.run_ort(model, {"x": x, "cond": np.array(c)}) for c in (True, False)}
    spec = {"bits": 8} if bits == 8 else {"bits": bits, "granularity": "block", "block_size": 32}
    result, ctx = apply(model, {"weights": spec, "format": "qdq"})
    onnx.checker.check_model(result.model, full_check=True)
    # the branch's own weight left the body and is stored as integers in the main graph
    assert _body_float_weights(result.model) == []
    assert set(ctx.layers) == {"W", "W_then"}
    assert ctx.layers["W_then"].node == "branch/MatMul_0" and ctx.layers["W_then"].bits == bits
    assert result.metrics["skipped"] == []
    if bits == 8:   # docs/recipes.md: symmetric per output channel, s = absmax / 127, q = rne(w / s)
        _, stored = dq_of(result.model, "W_then")
        s = (np.abs(w_then).max(axis=0) / np.float32(127)).astype(np.float32)
        np.testing.assert_array_equal(stored["q"], np.clip(np.rint(w_then / s), -128, 127))
    bound = 0.02 if bits == 8 else 0.15
    for cond in (True, False):     # both branches: the body reads the dequantized weights by name
        got = builders.run_ort(result.model, {"x": x, "cond": np.array(cond)})
        assert builders.rel_l2(expected[cond], got) < bound


def test_loop_body_weight_is_quantized_and_gptq_falls_back_to_rtn_inside_bodies():
    rng = np.random.default_rng(2)
    w_body = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, "W_step")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_step"], ["mm"], name="step_mm"),
         helper.make_node("Tanh", ["mm"], ["h_out"], name="step_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="step_cond")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)], [w_body])
    trips = numpy_helper.from_array(np.array(3, dtype=np.int64), "trips")
    keep_going = numpy_helper.from_array(np.array(True), "keep_going")
    g = helper.make_graph([helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="steps", body=body)],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
                          [trips, keep_going])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((8, 32)).astype(np.float32)
    expected = builders.run_ort(model, {"x": x})
    calibration = {"x": rng.standard_normal((64, 32)).astype(np.float32)}
    result, ctx = apply(model, {"weights": {"bits": 8}, "method": "gptq"}, calibration=calibration)
    onnx.checker.check_model(result.model, full_check=True)
    assert _body_float_weights(result.model) == [] and list(ctx.layers) == ["W_step"]
    assert ctx.layers["W_step"].extra["method"] == "rtn"       # no activation capture inside a Loop
    assert "W_step" in result.metrics["rtn_fallback"]
    assert builders.rel_l2(expected, builders.run_ort(result.model, {"x": x})) < 0.02


def test_body_weight_whose_name_is_taken_outside_stays_float_and_is_reported():
    # the branch's initializer is called "W" like the main graph's: hoisting it would change what
    # the main graph's MatMul reads, so it stays in the body, float, and the report says why
    model = _if_model(then_init="W")
    feeds = {"x": np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32), "cond": np.array(True)}
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}})
    assert list(ctx.layers) == ["W"]
    assert result.metrics["skipped"] == [{"name": "W", "node": "branch",
                                          "reason": "weight inside a If subgraph stays float "
                                                    "(its name is taken in the outer scope)"}]
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.03


def test_sign_stores_int2_signs_and_mean_abs_alpha():
    from worker.pipeline.quantize.sign import ort_runs_int2

    model = builders.mlp()
    w1 = weight(model, "W1")
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 1}})
    assert ort_runs_int2()
    node, stored = dq_of(result.model, "W1")
    assert helper.get_attribute_value(node.attribute[0]) == 1
    q_init = next(t for t in result.model.graph.initializer if t.name == node.input[0])
    assert q_init.data_type == TensorProto.INT2 and len(q_init.raw_data) == w1.size // 4
    np.testing.assert_array_equal(stored["q"], np.where(w1 >= 0, 1, -1))
    np.testing.assert_allclose(stored["scale"], np.mean(np.abs(w1), axis=0), rtol=1e-6)
    assert ctx.layers["W1"].bits == 1 and ctx.layers["W1"].grid["bits"] == 1
    assert result.metrics["storage"] == "int2"
    assert [o.version for o in result.model.opset_import if o.domain == ""][0] >= 25
    # sign keeps the direction of each output roughly (cosine of the logits well above 0)
    got = builders.run_ort(result.model, feeds)[0].ravel()
    cosine = float(np.dot(got, expected[0].ravel()) / np.linalg.norm(got) / np.linalg.norm(expected[0]))
    assert cosine > 0.7


def test_sign_on_conv_per_output_channel():
    model = builders.cnn_bn()
    w2 = weight(model, "conv2.W")
    feeds = builders.random_inputs(model)
    result, _ = apply(model, {"weights": {"bits": 1}, "min_params": 512})
    node, stored = dq_of(result.model, "conv2.W")
    assert helper.get_attribute_value(node.attribute[0]) == 0
    np.testing.assert_allclose(stored["scale"], np.mean(np.abs(w2), axis=(1, 2, 3)), rtol=1e-6)
    out = builders.run_ort(result.model, feeds)[0]
    assert out.shape == (16, 10) and np.isfinite(out).all()


def test_gptq_keeps_pruned_weights_at_zero():
    from worker.pipeline.step import LayerRecord

    model = builders.mlp()
    w1 = weight(model, "W1")
    mask = np.abs(w1) > np.median(np.abs(w1))
    pruned = np.where(mask, w1, 0).astype(np.float32)
    for tensor in model.graph.initializer:
        if tensor.name == "W1":
            tensor.CopyFrom(numpy_helper.from_array(pruned, "W1"))
    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = StepContext(original=original, calibration=correlated(model, 128, seed=1),
                      layers={"W1": LayerRecord("W1", "fc1", "MatMul", sparsity=0.5, mask=mask)})
    params = step({"weights": {"bits": 4, "granularity": "block", "symmetric": False}, "method": "gptq",
                   "format": "qdq"})
    result = quantize_step.run(model, params, ctx)
    _, stored = dq_of(result.model, "W1")
    zeros = np.repeat(stored["zero_point"], 32, axis=0)
    np.testing.assert_array_equal(stored["q"][~mask], zeros[~mask])
    assert ctx.layers["W1"].sparsity == 0.5 and ctx.layers["W1"].bits == 4
