"""The fp16 step: float16 weights and compute, float32 I/O kept, overflowing ops kept in float32,
no NaN; every model runs in ONNX Runtime's CPU provider. Output bound: rel_l2 < 1e-2 (float16
keeps ~3 decimal digits) unless a test says otherwise."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline.runner import io_signature
from worker.pipeline.step import StepContext
from worker.pipeline.steps import fp16


def convert(model: onnx.ModelProto, **spec):
    original = onnx.ModelProto()
    original.CopyFrom(model)
    params = parse_recipe({"steps": [{"op": "fp16", **spec}]}).steps[0]
    ctx = StepContext(original=original)
    fp16.check(model, params, ctx)
    result = fp16.run(model, params, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    assert io_signature(result.model) == io_signature(original)
    return result, ctx


def kept(result) -> dict[str, str]:
    return {row["node"]: row["reason"] for row in result.metrics["kept_float32"]}


@pytest.mark.parametrize("build", [builders.mlp, builders.cnn_bn, builders.attention, builders.embedding_gru])
def test_models_convert_and_stay_close(build):
    model = build()
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, _ = convert(model)
    got = builders.run_ort(result.model, feeds)
    assert all(np.isfinite(g).all() and g.dtype == np.float32 for g in got)
    assert builders.rel_l2(expected, got) < 1e-2
    assert result.metrics["fp16_nodes"] > 0


def test_weights_are_stored_in_float16_and_recorded():
    result, ctx = convert(builders.mlp())
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert all(t == TensorProto.FLOAT16 for t in types.values()), types
    assert ctx.layers["W1"].bits == 16 and ctx.layers["W1"].extra["sqnr_db"] > 60
    size32 = sum(t.ByteSize() for t in builders.mlp().graph.initializer)
    size16 = sum(t.ByteSize() for t in result.model.graph.initializer)
    assert size16 < 0.55 * size32


def overflow_model() -> onnx.ModelProto:
    """h = x W1; big = h * 1e5 (past float16); back = big / 1e5; y = back W2."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(1e5, np.float32), "k")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Mul", ["h", "k"], ["big"], name="scale_up"),
             helper.make_node("Div", ["big", "k"], ["back"], name="scale_down"),
             helper.make_node("MatMul", ["back", "W2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_overflowing_tensors_stay_float32():
    model = overflow_model()
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, _ = convert(model)
    reasons = kept(result)
    assert {"scale_up", "scale_down"} <= set(reasons)
    assert "reaches" in reasons["scale_up"]
    got = builders.run_ort(result.model, feeds)
    assert np.isfinite(got[0]).all() and builders.rel_l2(expected, got) < 1e-2
    # the initializer 1e5 is within float16's range but read only by float32 nodes: stays float32
    assert {t.name: t.data_type for t in result.model.graph.initializer}["k"] == TensorProto.FLOAT


def masked_attention() -> onnx.ModelProto:
    """scores = q k^T + mask, mask = float32 min where mask_in is 0 (as exporters write it)."""
    rng = np.random.default_rng(1)
    d = 16
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) / 4, "Wq"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("Transpose", ["x"], ["xt"], name="xt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "xt"], ["scores"], name="scores"),
             helper.make_node("Equal", ["mask_in", "zero"], ["pad"], name="is_pad"),
             helper.make_node("Where", ["pad", "neg", "zero"], ["bias"], name="mask_bias"),
             helper.make_node("Unsqueeze", ["bias", "axis1"], ["bias3"], name="bias3"),
             helper.make_node("Add", ["scores", "bias3"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["attn"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["attn", "x"], ["y"], name="context")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, d]),
                                       helper.make_tensor_value_info("mask_in", TensorProto.FLOAT, ["batch", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def position_bucket_model() -> onnx.ModelProto:
    """T5's relative-position bucket: b = int(log((d + 8) / 8) / log(16) * 8) read from a bias table, plus
    x W; and token ids cast to float and scaled, data that never becomes an integer again."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "bias_table"),
             numpy_helper.from_array(np.array(8.0, np.float32), "exact"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    # log(16) as PyTorch writes scalars: a Constant node, rounded to float16 it moves buckets too
    log_span = numpy_helper.from_array(np.array(np.log(16.0), np.float32))
    nodes = [helper.make_node("Constant", [], ["log_span"], value=log_span, name="log_span"),
             helper.make_node("Cast", ["distance"], ["d"], to=TensorProto.FLOAT, name="to_float"),
             helper.make_node("Add", ["d", "exact"], ["shifted"], name="shifted"),
             helper.make_node("Div", ["shifted", "exact"], ["ratio"], name="ratio"),
             helper.make_node("Log", ["ratio"], ["log_ratio"], name="log"),
             helper.make_node("Div", ["log_ratio", "log_span"], ["share"], name="share"),
             helper.make_node("Mul", ["share", "exact"], ["scaled"], name="scaled"),
             helper.make_node("Cast", ["scaled"], ["bucket"], to=TensorProto.INT64, name="to_bucket"),
             helper.make_node("Gather", ["bias_table", "bucket"], ["bias"], name="bias"),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
             helper.make_node("Cast", ["distance"], ["ids"], to=TensorProto.FLOAT, name="ids_to_float"),
             helper.make_node("Mul", ["ids", "half"], ["ids_out"], name="ids_scaled")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                                       helper.make_tensor_value_info("distance", TensorProto.INT64, ["batch"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
                           helper.make_tensor_value_info("ids_out", TensorProto.FLOAT, ["batch"])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_integers_computed_through_float_stay_float32():
    # distance 8: log(2) / log(16) * 8 is 2.0 in float32, 1.99 in float16 (bucket 1: the wrong row)
    model = position_bucket_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((120, 8)).astype(np.float32),
             "distance": np.arange(0, 120, dtype=np.int64)}
    expected = builders.run_ort(model, feeds)
    result, _ = convert(model)
    got = builders.run_ort(result.model, feeds)
    bias = builders.run_ort(model, feeds)[0] - feeds["x"] @ numpy_helper.to_array(model.graph.initializer[0])
    got_bias = got[0] - feeds["x"] @ numpy_helper.to_array(model.graph.initializer[0])
    assert np.abs(got_bias - bias).max() < 0.02        # every row right: a wrong row is off by ~1
    assert builders.rel_l2(expected[:1], got[:1]) < 2e-3
    reasons = kept(result)
    assert all("index" in reasons.get(name, "") for name in
               ("to_float", "shifted", "ratio", "log", "share", "scaled", "to_bucket", "log_span"))
    assert "mm" not in reasons and "ids_scaled" not in reasons and "ids_to_float" not in reasons


def test_float_min_attention_mask_gives_no_nan():
    model = masked_attention()
    rng = np.random.default_rng(2)
    mask = np.ones((8, 6), np.float32)
    mask[:, 4:] = 0.0
    feeds = {"x": rng.standard_normal((8, 6, 16)).astype(np.float32), "mask_in": mask}
    expected = builders.run_ort(model, feeds)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    params = parse_recipe({"steps": [{"op": "fp16"}]}).steps[0]
    result = fp16.run(model, params, StepContext(original=original, calibration=feeds))
    reasons = {row["node"]: row["reason"] for row in result.metrics["kept_float32"]}
    assert {"mask_bias", "add_mask"} <= set(reasons)
    got = builders.run_ort(result.model, feeds)
    assert np.isfinite(got[0]).all()
    assert builders.rel_l2(expected, got) < 1e-2


def test_op_block_list_and_keep_io_types():
    result, _ = convert(builders.mlp(), op_block_list=["MatMul"])
    assert kept(result)["fc1"] == "in op_block_list"
    model = builders.mlp()
    params = parse_recipe({"steps": [{"op": "fp16", "keep_io_types": False}]}).steps[0]
    with pytest.raises(RecipeError) as info:
        fp16.check(model, params, StepContext(original=model))
    assert info.value.errors[0]["loc"] == ["keep_io_types"]


def test_after_weight_quantization_through_the_runner(tmp_path):
    from worker.pipeline import runner

    path = tmp_path / "m.onnx"
    onnx.save_model(builders.attention(), str(path))
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "block"},
                                      "format": "qdq"}, {"op": "fp16"}]})
    report = runner.run(path, recipe, workdir=tmp_path / "w", options={"latency_runs": 5}).report
    assert [s["op"] for s in report["steps"]] == ["quantize", "fp16"]
    assert report["fidelity"]["rel_l2"] < 0.1
    assert {row["bits"] for row in report["layers"]} == {4}      # quantized weights stay 4-bit
    model = onnx.load(str(tmp_path / "w" / "model.onnx"))
    # the weights' scales, found by what reads them (the file gives invented tensors short names)
    read_as_scale = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    scales = [t for t in model.graph.initializer if t.name in read_as_scale]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)


def assert_loads_in_a_child(path) -> None:
    """ONNX Runtime loads ``path`` with every session's default optimizations, in a child process:
    the NchwcTransformer crash (SIGSEGV) fails the test instead of killing it."""
    import subprocess
    import sys

    load = subprocess.run([sys.executable, "-c", "import onnxruntime as ort, sys; "
                           "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr[-500:]


def batch_first_projection(tied: bool) -> onnx.ModelProto:
    """y = x.transpose(0, 1) @ W, as nn.MultiheadAttention(batch_first=True) exports its input
    projection; ``tied``: W reaches the MatMul through an Identity, as a shared weight does."""
    rng = np.random.default_rng(3)
    weight = "W_tied" if tied else "W"
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="to_time_major", perm=[1, 0, 2]),
             helper.make_node("MatMul", ["xt", weight], ["y"], name="in_proj")]
    if tied:
        nodes.insert(0, helper.make_node("Identity", ["W"], ["W_tied"], name="tie"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, "batch", 48])],
                          [numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tied", [False, True])
def test_a_transpose_into_a_constant_matmul_stays_float32_so_onnx_runtime_loads_it(tmp_path, tied):
    # ONNX Runtime's NchwcTransformer segfaults loading the float16 pattern (on a CPU with
    # AVX512-FP16; elsewhere it loads either way): loaded in a child process with every session's
    # default optimizations, so a crash fails the test instead of killing it
    model = batch_first_projection(tied)
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, _ = convert(model)
    assert "NchwcTransformer" in kept(result)["to_time_major"]
    assert "in_proj" not in kept(result)            # the product and its weight are still float16
    assert [t.data_type for t in result.model.graph.initializer] == [TensorProto.FLOAT16]
    path = tmp_path / "fp16.onnx"
    onnx.save(result.model, str(path))
    assert_loads_in_a_child(path)
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 1e-2


def test_a_tied_tables_transpose_goes_float16_with_the_table(tmp_path):
    # ids -> Gather(table) ... -> MatMul(h, Transpose(table)): the Transpose of a constant is folded at
    # load, not the crash's pattern; kept float32 it stored the table twice (0.80x of the float file)
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6, 256])],
                          [numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32) * 0.1, "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"ids": rng.integers(0, 256, (3, 6)).astype(np.int64)}
    result, _ = convert(model)
    assert "tie" not in kept(result)
    assert [t.data_type for t in result.model.graph.initializer] == [TensorProto.FLOAT16]
    path = tmp_path / "tied.onnx"
    onnx.save(result.model, str(path))
    assert_loads_in_a_child(path)
    assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(result.model, feeds)) < 1e-2


def test_fp16_of_its_own_output_keeps_that_transpose_float32(tmp_path):
    # the second pass saw Transpose (float32) -> Cast -> MatMul on float16 inputs: the MatMul had no
    # plan, the Transpose went float16, and the file it wrote killed ONNX Runtime (SIGSEGV, exit 139)
    model = batch_first_projection(tied=False)
    feeds = builders.random_inputs(model)
    once, _ = convert(model)
    twice, _ = convert(once.model)
    assert "NchwcTransformer" in kept(twice)["to_time_major"]
    transpose = next(n for n in twice.model.graph.node if n.name == "to_time_major")
    producers = {o: n for n in twice.model.graph.node for o in n.output}
    source = producers.get(transpose.input[0])
    # it reads float32: the graph input itself or a Cast to float32
    assert source is None or (source.op_type == "Cast" and source.attribute[0].i == TensorProto.FLOAT)
    path = tmp_path / "fp16-twice.onnx"
    onnx.save(twice.model, str(path))
    assert_loads_in_a_child(path)
    assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(twice.model, feeds)) < 1e-2


def test_after_static_int8_the_integer_kernels_stay_whole(tmp_path):
    # a Conv between an activation's Q/DQ pair converted to float16 behind Casts is no int8 kernel,
    # and ONNX Runtime's full optimization ran a ConvNeXt's depthwise Conv on a wrong layout there
    from worker.pipeline import runner

    path = tmp_path / "m.onnx"
    model = builders.cnn_bn()
    onnx.save_model(model, str(path))
    data = builders.random_inputs(model, count=16)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {}}, {"op": "fp16"}]})
    result = runner.run(path, recipe, calibration=data, workdir=tmp_path / "w", options={"latency_runs": 2})
    reasons = {row["node"]: row["reason"] for row in result.report["steps"][1]["kept_float32"]}
    out = onnx.load(str(result.model_path))
    produced_by = {o: n for n in out.graph.node for o in n.output}
    kernels = [node.name for node in out.graph.node
               if node.op_type in ("Conv", "Gemm", "MatMul") and produced_by.get(node.input[0]) is not None
               and produced_by[node.input[0]].op_type == "DequantizeLinear"]
    assert kernels and all("int8 kernel" in reasons.get(name, "") for name in kernels)
    assert result.report["fidelity"]["rel_l2"] < 0.05
