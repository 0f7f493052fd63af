"""prune: unstructured magnitude (layer / global), N:M, SparseGPT, and channel pruning."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.graph import get_array, weight_layers
from worker.pipeline.step import StepContext
from worker.pipeline.steps import prune

from .structure_models import mlp_fp16, assert_valid_same_io, attention, cnn, inputs_for, mlp, rel_l2, run_model


def _params(op="prune", **fields):
    return parse_recipe({"steps": [{"op": op, **fields}]}).steps[0]


def _zeros(model, names):
    return sum(int(np.count_nonzero(get_array(model, n) == 0)) for n in names)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_meets_sparsity_exactly_and_runs(scope):
    model = mlp()
    ctx = StepContext(original=model)
    result = prune.run(model, _params(sparsity=0.5, scope=scope, min_params=0), ctx)
    feeds = inputs_for(model)
    assert_valid_same_io(result.model, model, feeds)
    names = ["w1", "w2", "w3"]
    total = sum(get_array(model, n).size for n in names)
    assert _zeros(result.model, names) == round(0.5 * total)
    if scope == "layer":
        for n in names:
            assert ctx.layers[n].sparsity == pytest.approx(round(0.5 * get_array(model, n).size) / get_array(model, n).size)
    for n in names:
        record = ctx.layers[n]
        w = get_array(result.model, n)
        assert record.mask.shape == w.shape
        assert np.all(w[~record.mask] == 0)
        assert record.sparsity == pytest.approx(float(np.mean(w == 0)))
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert {layer["name"] for layer in result.metrics["layers"]} == set(names)


def test_magnitude_ties_still_exact():
    """Weights already zero tie at the threshold; the count of zeros is still exactly the request."""
    model = mlp()
    w1 = get_array(model, "w1").copy()
    w1[:, :64] = 0.0        # half of w1 already zero
    from worker.pipeline.graph import set_array
    set_array(model, "w1", w1)
    result = prune.run(model, _params(sparsity=0.25, scope="layer", include=["w1"], min_params=0), StepContext(original=model))
    assert _zeros(result.model, ["w1"]) == w1.size // 2    # at least the zeros already there
    result = prune.run(model, _params(sparsity=0.75, scope="layer", include=["w1"], min_params=0), StepContext(original=model))
    assert _zeros(result.model, ["w1"]) == round(0.75 * w1.size)


def test_global_scope_protects_fast_growing_layers():
    """A layer with few large weights (w3) gets less than the average sparsity; the pruned weights
    are the smallest |w|/||W||, and the total is exact."""
    model = mlp()
    result = prune.run(model, _params(sparsity=0.6, scope="global", min_params=0), StepContext(original=model))
    per_layer = {layer["name"]: layer["sparsity"] for layer in result.metrics["layers"]}
    assert per_layer["w3"] < 0.6 < max(per_layer.values())
    for name in ("w1", "w2", "w3"):
        before = np.abs(get_array(model, name)) / np.linalg.norm(get_array(model, name))
        after = get_array(result.model, name)
        assert before[after == 0].max() <= before[after != 0].min() + 1e-7


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_along_input_axis(pattern):
    n, m = map(int, pattern.split(":"))
    model = mlp()
    ctx = StepContext(original=model)
    result = prune.run(model, _params(sparsity=0.0, structure=pattern, min_params=0), ctx)
    assert_valid_same_io(result.model, model, inputs_for(model))
    for layer in weight_layers(model, min_params=0):
        w = np.moveaxis(get_array(result.model, layer.weight), layer.in_axis, -1)
        groups = (w.reshape(-1, m) != 0).sum(axis=1)
        assert np.all(groups <= n) and np.mean(groups) > n - 0.01
        assert ctx.layers[layer.weight].sparsity == pytest.approx(1 - n / m)


def test_n_m_skips_layers_whose_input_axis_does_not_divide():
    model = mlp()
    result = prune.run(model, _params(sparsity=0.0, structure="16:32", min_params=0), StepContext(original=model))
    skipped = {s["name"] for s in result.metrics["skipped"]}
    # w1's input axis is 64, w2's 128, w3's 64: all multiples of 32, none skipped
    assert skipped == set()
    result = prune.run(mlp(hidden=80), _params(sparsity=0.0, structure="2:32", min_params=0), StepContext(original=model))
    assert {s["name"] for s in result.metrics["skipped"]} == {"w2"}


def test_sparsegpt_beats_magnitude_on_attention_block():
    model = attention()
    rng = np.random.default_rng(3)
    # correlated features of unequal scale, as real activations have: where OBS beats |w|
    mix = rng.standard_normal((32, 32)) * np.logspace(-1, 0.5, 32)[:, None]
    calibration = {"x": (rng.standard_normal((64, 6, 32)) @ mix).astype(np.float32)}
    feeds = {"x": (rng.standard_normal((16, 6, 32)) @ mix).astype(np.float32)}
    want = run_model(model, feeds)[0]
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        ctx = StepContext(original=model, calibration=calibration)
        result = prune.run(model, _params(sparsity=0.5, method=method, scope="layer", min_params=0), ctx)
        got = assert_valid_same_io(result.model, model, feeds)[0]
        errors[method] = rel_l2(got - feeds["x"], want - feeds["x"])   # error of the block's update
        if method == "sparsegpt":
            for name in ("wq", "wk", "wv", "wo", "w_up", "w_down"):
                assert ctx.layers[name].sparsity == 0.5          # exact, though the kernel works per block
                assert "sparsegpt" in {l["method"] for l in result.metrics["layers"]}
    assert errors["sparsegpt"] < 0.85 * errors["magnitude"]


def test_sparsegpt_on_conv_and_n_m():
    model = cnn()
    rng = np.random.default_rng(4)
    calibration = {"x": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    ctx = StepContext(original=model, calibration=calibration)
    result = prune.run(model, _params(sparsity=0.0, structure="2:4", method="sparsegpt", min_params=0), ctx)
    assert_valid_same_io(result.model, model, inputs_for(model))
    w = get_array(result.model, "conv2_w")
    groups = (np.moveaxis(w, 1, -1).reshape(-1, 4) != 0).sum(axis=1)
    assert np.all(groups <= 2)
    assert {l["name"]: l["method"] for l in result.metrics["layers"]}["conv2_w"] == "sparsegpt"


def test_sparsegpt_needs_calibration():
    model = mlp()
    with pytest.raises(Exception) as info:
        prune.run(model, _params(sparsity=0.5, method="sparsegpt"), StepContext(original=model))
    assert info.value.errors[0]["loc"] == ["method"]


def test_selection_that_matches_nothing_is_refused():
    model = mlp()
    for call in (prune.check, prune.run):
        with pytest.raises(RecipeError) as info:
            call(model, _params(sparsity=0.5, include=["nothing*"]), StepContext(original=model))
        assert info.value.errors[0]["loc"] == ["include"]
    with pytest.raises(RecipeError):          # the default min_params (1024) leaves w3 [10, 64] out
        prune.check(model, _params(sparsity=0.5, include=["w3"]), StepContext(original=model))
    prune.check(model, _params(sparsity=0.5, include=["w3"], min_params=0), StepContext(original=model))


@pytest.mark.parametrize("fields,loc", [({"sparsity": 1.0}, ["steps", 0, "sparsity"]),
                                        ({"sparsity": 0.5, "structure": "4:2"}, ["steps", 0, "structure"]),
                                        ({"sparsity": -0.1}, ["steps", 0, "sparsity"])])
def test_bad_parameters_refused_with_field_paths(fields, loc):
    with pytest.raises(RecipeError) as info:
        _params(**fields)
    assert info.value.errors[0]["loc"] == loc


# -- structure: channel -----------------------------------------------------------------------------

def _dims(model):
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def test_channel_pruning_shrinks_cnn_consistently_across_the_residual():
    model = cnn()
    ctx = StepContext(original=model, options={"channel_block": 1})
    result = prune.run(model, _params(sparsity=0.3, structure="channel", min_params=0), ctx)
    assert_valid_same_io(result.model, model, inputs_for(model))
    dims = _dims(result.model)
    # conv1 and conv3 feed the residual Add: one group, the same channels removed from both
    assert dims["conv1_w"][0] == dims["conv3_w"][0] == dims["conv2_w"][1] == dims["conv4_w"][1] == 11
    assert dims["conv2_w"] == (11, 11, 3, 3) and dims["bn2_scale"] == (11,) and dims["bn3_var"] == (11,)
    assert dims["conv4_w"][0] == dims["conv4_b"][0] == dims["fc_w"][1] == 23
    assert dims["fc_w"][0] == 10                        # the logits reach the graph output: kept
    assert {s["name"] for s in result.metrics["skipped"]} == {"fc_w"}
    assert result.metrics["params_after"] < 0.55 * result.metrics["params_before"]
    assert ctx.layers["conv4_w"].extra["shape"] == [23, 11, 3, 3]
    # a consumer that only lost input columns is recorded too (distill refits it), nothing masked inside
    assert ctx.layers["fc_w"].mask.shape == (10, 23) and ctx.layers["fc_w"].mask.all()
    kept = ctx.layers["conv4_w"].extra["kept_outputs"]
    assert ctx.layers["fc_w"].extra["kept_inputs"] == kept and len(kept) == 23 and kept == sorted(kept)
    np.testing.assert_array_equal(get_array(result.model, "conv4_w")[:, :, :, :],
                                  get_array(model, "conv4_w")[kept][:, ctx.layers["conv4_w"].extra["kept_inputs"]])
    assert result.metrics["channel_sparsity"] == pytest.approx(round(0.3 * 64) / 64)


def test_channel_pruning_removes_the_least_important_channels_exactly():
    """Hidden features of fc1 with zero weights and zero bias contribute nothing: removing exactly
    those leaves the output unchanged, and the step picks exactly those."""
    from worker.pipeline.graph import set_array
    model = mlp()
    w1, b1 = get_array(model, "w1").copy(), get_array(model, "b1").copy()
    dead = np.arange(0, 128, 4)
    w1[:, dead] = 0.0
    b1[dead] = 0.0
    set_array(model, "w1", w1)
    set_array(model, "b1", b1)
    result = prune.run(model, _params(sparsity=0.25, structure="channel", include=["w1"], min_params=0),
                       StepContext(original=model))
    feeds = inputs_for(model)
    got = assert_valid_same_io(result.model, model, feeds)[0]
    np.testing.assert_allclose(got, run_model(model, feeds)[0], rtol=1e-5, atol=1e-5)
    assert _dims(result.model)["w1"] == (64, 96) and _dims(result.model)["w2"] == (96, 64)
    assert any("not selected" in s["reason"] for s in result.metrics["skipped"])


def test_channel_pruning_keeps_earlier_masks_aligned():
    model = mlp()
    ctx = StepContext(original=model)
    first = prune.run(model, _params(sparsity=0.5, min_params=0), ctx)
    ctx.options["channel_block"] = 1
    second = prune.run(first.model, _params(sparsity=0.25, structure="channel", min_params=0), ctx)
    for name in ("w1", "w2"):
        w = get_array(second.model, name)
        assert ctx.layers[name].mask.shape == w.shape
        assert np.all(w[~ctx.layers[name].mask] == 0)


def test_channel_pruning_through_concat_and_explicit_reshape():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "wb"),
             numpy_helper.from_array(np.array([-1, 16 * 8 * 8], np.int64), "flat"),
             numpy_helper.from_array(rng.standard_normal((16 * 8 * 8, 5)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(5, np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="ca", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="cb", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Concat", ["ra", "b"], ["c"], name="cat", axis=1),
             helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert_valid_same_io(result.model, model, feeds)
    dims = _dims(result.model)
    assert dims["wa"] == (4, 3, 3, 3) and dims["wb"] == (4, 3, 3, 3) and dims["wf"] == (8 * 64, 5)
    assert get_array(result.model, "flat").tolist() == [-1, 8 * 64]
    # the rows of wf kept are exactly those of the kept channels, H*W rows per channel
    kept_a = [c for c in range(8) if any(np.array_equal(get_array(model, "wa")[c], k) for k in get_array(result.model, "wa"))]
    wf, wf_new = get_array(model, "wf"), get_array(result.model, "wf")
    np.testing.assert_array_equal(wf_new[:4 * 64], np.concatenate([wf[c * 64:(c + 1) * 64] for c in kept_a]))


def test_a_grouped_convolution_channel_pruning_leaves_is_named():
    # it was in neither layers nor skipped (a sweep's grouped CNN: channel_sparsity 0, nothing said)
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "stem"),
             numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), "grouped")]
    nodes = [helper.make_node("Conv", ["x", "stem"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "grouped"], ["b"], name="c2", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Relu", ["b"], ["y"], name="relu2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    skipped = {row["name"]: row["reason"] for row in result.metrics["skipped"]}
    assert "grouped convolution (group 4)" in skipped["grouped"]
    assert "stem" in " ".join(skipped)         # its channels feed the grouped conv, which blocks them


def test_channels_go_in_whole_hardware_blocks():
    from worker.pipeline.prune.channels import apportion
    # the digits CNN: 30 % of 32 + 64 channels in blocks of 16 -> 16 + 16 removed (33 %)
    assert apportion([32, 64], 0.3, 16) == [16, 16]
    assert apportion([32, 64], 0.3, 8) == [8, 24]                  # 32 of 96: the nearest to 28.8 in blocks of 8
    assert apportion([16, 16, 32], 0.3, 1) == [5, 5, 9]           # largest remainders: exactly 19
    assert apportion([24, 10], 0.5, 16) == [12, 5]                 # below two blocks: single channels
    assert apportion([32], 0.99, 16) == [16]                       # a block is always kept
    model = mlp()
    result = prune.run(model, _params(sparsity=0.3, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 16}))
    assert_valid_same_io(result.model, model, inputs_for(model))
    assert all(row["kept"] % 16 == 0 for row in result.metrics["layers"])
    assert result.metrics["channel_block"] == 16


def test_channel_pruning_with_calibration_refits_the_layers_that_lose_inputs():
    """Least-squares compensation: with calibration data the pruned model's outputs are closer to
    the original's than with slicing alone."""
    rng = np.random.default_rng(11)
    for build, shape in ((mlp, (256, 64)), (cnn, (64, 3, 16, 16))):
        model = build()
        calibration = {"x": rng.standard_normal(shape).astype(np.float32)}
        feeds = {"x": rng.standard_normal((32,) + shape[1:]).astype(np.float32)}
        want = run_model(model, feeds)[0]
        errors = []
        for data in (None, calibration):
            result = prune.run(model, _params(sparsity=0.3, structure="channel", min_params=0),
                               StepContext(original=model, calibration=data, options={"channel_block": 1}))
            errors.append(rel_l2(assert_valid_same_io(result.model, model, feeds)[0], want))
        assert errors[1] < 0.7 * errors[0], (build.__name__, errors)


def test_quantizing_after_pruning_keeps_zeros_zero():
    """Steps compose: the int8 weights the quantize step writes decode to exactly zero wherever
    prune left a zero (its LayerRecord mask), whichever storage the quantize step picks."""
    from worker.pipeline.sessions import session
    from worker.pipeline.steps import quantize
    model = mlp()
    ctx = StepContext(original=model)
    pruned = prune.run(model, _params(sparsity=0.5, min_params=0), ctx)
    quantized = quantize.run(pruned.model, _params("quantize", weights={"bits": 8}, min_params=0), ctx)
    assert_valid_same_io(quantized.model, model, inputs_for(model))
    # fed the identity, fc1's output (before its bias Add) is the effective weight w1 itself
    effective = session(quantized.model, outputs=["h1"]).run(["h1"], {"x": np.eye(64, dtype=np.float32)})[0]
    mask = ctx.layers["w1"].mask
    # stored zeros decode to 0; ONNX Runtime's int8 GEMM may compute s*(sum x q_u) - s*zp*sum(x),
    # which leaves float rounding (about 1e-8) where the weight is zero, so compare at that scale
    assert np.abs(effective[~mask]).max() <= 1e-6 * np.abs(effective).max()
    assert np.count_nonzero(np.abs(effective[mask]) > 1e-6 * np.abs(effective).max()) >= 0.99 * mask.sum()


def test_channel_pruning_through_depthwise_conv_and_gating_mul():
    """conv1 -> relu -> depthwise (group = C) -> Mul by a sigmoid gate computed from the same
    channels (squeeze-excite) -> conv3: the depthwise weight, bias and group shrink with conv1, the
    gate's producer joins conv1's group, conv3 loses the matching inputs."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", f(8, 3, 3, 3)), ("b1", f(8)), ("wd", f(8, 1, 3, 3)), ("bd", f(8)),
        ("wg", f(8, 8, 1, 1)), ("w3", f(6, 8, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["dw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["dw"], ["gp"], name="squeeze"),
             helper.make_node("Conv", ["gp", "wg"], ["ge"], name="excite"),
             helper.make_node("Sigmoid", ["ge"], ["gate"], name="gate"),
             helper.make_node("Mul", ["dw", "gate"], ["scaled"], name="scale"),
             helper.make_node("Conv", ["scaled", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ctx = StepContext(original=model, options={"channel_block": 1})
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0), ctx)
    feeds = {"x": f(2, 3, 6, 6)}
    assert_valid_same_io(result.model, model, feeds)
    dims = _dims(result.model)
    assert dims["w1"] == (4, 3, 3, 3) and dims["wd"] == (4, 1, 3, 3) and dims["bd"] == (4,)
    assert dims["wg"] == (4, 4, 1, 1) and dims["w3"] == (6, 4, 1, 1)
    depthwise = next(n for n in result.model.graph.node if n.name == "depthwise")
    assert next(a.i for a in depthwise.attribute if a.name == "group") == 4
    assert len(result.metrics["layers"]) == 1 and result.metrics["layers"][0]["removed"] == 4


@pytest.mark.parametrize("fields", [{"sparsity": 0.5}, {"sparsity": 0.5, "method": "sparsegpt"},
                                    {"sparsity": 0.0, "structure": "2:4"}, {"sparsity": 0.3, "structure": "channel"}])
def test_float16_weights_keep_their_dtype(fields):
    model = mlp_fp16()
    rng = np.random.default_rng(0)
    ctx = StepContext(original=model, calibration={"x": rng.standard_normal((64, 64)).astype(np.float16)},
                      options={"channel_block": 1})
    result = prune.run(model, _params(min_params=0, **fields), ctx)
    got = assert_valid_same_io(result.model, model, {"x": rng.standard_normal((8, 64)).astype(np.float16)})[0]
    assert got.dtype == np.float16
    assert {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)} == {10}


def test_channel_pruning_blocks_at_custom_domain_ops():
    """A node of another domain reading a grouped tensor (even one named like an internal method)
    blocks its group instead of being guessed at."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("act", ["h"], ["g"], name="custom", domain="example.custom"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    reasons = {s["name"]: s["reason"] for s in result.metrics["skipped"]}
    assert "act custom reads h" in reasons["w1"]
    assert _dims(result.model)["w1"] == (8, 16)


def test_channel_pruning_keeps_a_dropout_mask_that_is_a_graph_output():
    """A Dropout's mask given out as a model output keeps its channels: pruning through it shrank
    the mask against its declared shape and the job failed (exit 1)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Dropout", ["h"], ["d", "mask"], name="drop"),
             helper.make_node("MatMul", ["d", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    assert _dims(result.model)["w1"] == (8, 16)
    onnx.checker.check_model(result.model, full_check=True)


def test_drift_correction_is_identity_without_drift_and_exact_least_squares_with_it():
    from worker.pipeline.hessians import drift_corrected
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4000, 12))
    m = rng.standard_normal((5, 12))
    h = x.T @ x / len(x)
    np.testing.assert_allclose(drift_corrected(m, h, h), m, rtol=1e-10, atol=1e-12)
    # inputs that drifted by a rotation: the refit weights reproduce the original outputs (up to
    # the ridge's pull towards M, 1 % of the mean input energy)
    x_now = x @ np.linalg.qr(rng.standard_normal((12, 12)))[0]
    fitted = drift_corrected(m, x_now.T @ x_now / len(x), x.T @ x_now / len(x))
    plain = np.linalg.norm(x @ m.T - x_now @ m.T)
    assert np.linalg.norm(x @ m.T - x_now @ fitted.T) < 0.05 * plain


# ------------------------------------------------------------------------------ attention heads


def _without_heads(model, weight: str, heads: list[int], head_size: int):
    """The model with the output projection's rows of ``heads`` zeroed: what removing those heads computes."""
    from worker.pipeline.graph import set_array

    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    rows = get_array(reference, weight).copy()
    for head in heads:
        rows[head * head_size:(head + 1) * head_size] = 0.0
    set_array(reference, weight, rows)
    return reference


def _removed_heads(kept_columns: list[int], heads: int, head_size: int) -> list[int]:
    return sorted(set(range(heads)) - {column % (heads * head_size) // head_size for column in kept_columns})


def test_channel_pruning_removes_whole_attention_heads_exactly():
    """Separate Q, K, V projections: a head's columns go from all three, its rows from the output
    projection, the head count from the reshapes; the result computes the original without that head."""
    model = attention()
    ctx = StepContext(original=model, options={"channel_block": 1})
    result = prune.run(model, _params(sparsity=0.25, structure="channel", include=["wq", "wk", "wv"], min_params=0), ctx)
    feeds = inputs_for(model)
    got = assert_valid_same_io(result.model, model, feeds)[0]
    dims = _dims(result.model)
    assert dims["wq"] == dims["wk"] == dims["wv"] == (32, 24) and dims["wo"] == (24, 32)
    assert [layer for layer in result.metrics["layers"] if layer["op"] == "heads"] == [
        {"name": "wq, wk, wv, wo", "op": "heads", "channels": 4, "kept": 3, "removed": 1, "head_size": 8}]
    shapes = [get_array(result.model, n.input[1]).tolist() for n in result.model.graph.node if n.op_type == "Reshape"]
    assert shapes == [[0, 0, 3, 8]] * 3 + [[0, 0, 24]]
    removed = _removed_heads(ctx.layers["wq"].extra["kept_outputs"], 4, 8)
    assert len(removed) == 1 and ctx.layers["wo"].extra["kept_inputs"] == ctx.layers["wq"].extra["kept_outputs"]
    np.testing.assert_allclose(got, run_model(_without_heads(model, "wo", removed, 8), feeds)[0], atol=1e-5)


def test_packed_qkv_of_a_torch_export_loses_heads_in_all_three_thirds():
    from tests.unit.pipeline.quantize.test_attention_layout import _feeds, packed_attention

    model = packed_attention()
    ctx = StepContext(original=model, options={"channel_block": 1})
    result = prune.run(model, _params(sparsity=0.5, structure="channel", include=["W_qkv"], min_params=0), ctx)
    feeds = _feeds(model)
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert _dims(result.model)["W_qkv"] == (32, 48) and _dims(result.model)["b_qkv"] == (48,)
    assert _dims(result.model)["W_o"] == (16, 32)
    kept = ctx.layers["W_qkv"].extra["kept_outputs"]
    removed = _removed_heads(kept, 4, 8)
    assert len(removed) == 2 and [c // 32 for c in kept] == [0] * 16 + [1] * 16 + [2] * 16   # the same heads in q, k, v
    np.testing.assert_allclose(got, run_model(_without_heads(model, "W_o", removed, 8), feeds)[0], atol=1e-5)


def test_attention_that_is_not_head_by_head_keeps_its_heads():
    from tests.unit.pipeline.quantize.test_attention_layout import packed_attention

    model = packed_attention(packed_read_elsewhere=True)      # the packed projection is read elsewhere too
    result = prune.run(model, _params(sparsity=0.5, structure="channel", include=["W_qkv"], min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    assert _dims(result.model)["W_qkv"] == (32, 96)
    assert any(s["name"] == "W_qkv" and "ReduceSum" in s["reason"] for s in result.metrics["skipped"])


def _softmax_node(model):
    return next(n for n in model.graph.node if n.op_type == "Softmax")


@pytest.mark.parametrize("change", ["per-head mask", "softmax over the heads (opset 11, no axis)"])
def test_attention_whose_heads_are_not_independent_keeps_them(change):
    """A mask with one slice per head, or a Softmax that normalizes across heads (before opset 13 the
    default axis is 1), ties the heads together: no head may go."""
    from onnx import helper

    model = attention()
    if change == "per-head mask":
        mask = onnx.numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), "head_bias")
        model.graph.initializer.append(mask)
        scale = next(n for n in model.graph.node if n.name == "scale")
        scale.output[0] = "scaled_raw"
        index = list(model.graph.node).index(scale)
        model.graph.node.insert(index + 1, helper.make_node("Add", ["scaled_raw", "head_bias"], ["scaled"], name="bias"))
    else:
        for node in model.graph.node:      # opset 11 has no LayerNormalization: the block without them
            if node.op_type == "LayerNormalization":
                node.op_type = "Identity"
                del node.input[1:]
                del node.attribute[:]
        del _softmax_node(model).attribute[:]
        model.opset_import[0].version = 11
    result = prune.run(model, _params(sparsity=0.25, structure="channel", include=["wq", "wk", "wv"], min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    assert _dims(result.model)["wq"] == (32, 32) and _dims(result.model)["wo"] == (32, 32)
    assert not any(layer["op"] == "heads" for layer in result.metrics["layers"])


def test_with_calibration_the_head_that_adds_nothing_goes_whatever_its_weight_norms():
    """Head 2's values are zero, so it adds nothing to the output, but its query and key columns are
    the largest: weight norms would keep it; the measured contribution removes it, and the output stays."""
    from worker.pipeline.graph import set_array

    model = attention()
    for name, scale in (("wq", 4.0), ("wk", 4.0), ("wv", 0.0)):
        w = get_array(model, name).copy()
        w[:, 16:24] *= scale
        set_array(model, name, w)
    rng = np.random.default_rng(5)
    calibration = {"x": rng.standard_normal((64, 6, 32)).astype(np.float32)}
    for data, removed_head in ((None, None), (calibration, 2)):
        ctx = StepContext(original=model, calibration=data, options={"channel_block": 1})
        result = prune.run(model, _params(sparsity=0.25, structure="channel", include=["wq", "wk", "wv"], min_params=0), ctx)
        removed = _removed_heads(ctx.layers["wq"].extra["kept_outputs"], 4, 8)
        if removed_head is None:
            assert removed != [2]
        else:
            assert removed == [2]
            feeds = inputs_for(model)
            np.testing.assert_allclose(run_model(result.model, feeds)[0], run_model(model, feeds)[0], atol=1e-4)


def test_a_matmul_that_loses_inputs_moves_their_mean_into_the_bias_after_it():
    """fc2 (MatMul, then Add b2) loses ReLU features, whose mean is far from zero: the refit moves
    that mean into b2, and the output is closer than with b2 left as it was."""
    from worker.pipeline.graph import set_array

    model = mlp()
    rng = np.random.default_rng(2)
    calibration = {"x": rng.standard_normal((512, 64)).astype(np.float32)}
    feeds = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    result = prune.run(model, _params(sparsity=0.5, structure="channel", include=["w1"], min_params=0),
                       StepContext(original=model, calibration=calibration, options={"channel_block": 1}))
    b2 = get_array(result.model, "b2")
    assert b2.shape == get_array(model, "b2").shape and not np.allclose(b2, get_array(model, "b2"))
    old_bias = onnx.ModelProto()
    old_bias.CopyFrom(result.model)
    set_array(old_bias, "b2", get_array(model, "b2"))
    want = run_model(model, feeds)[0]
    assert rel_l2(run_model(result.model, feeds)[0], want) < 0.9 * rel_l2(run_model(old_bias, feeds)[0], want)


def test_channel_pruning_keeps_the_weights_an_if_body_reads_from_the_main_graph():
    # silero-vad's LSTM weights are main-graph initializers only its If branches read: the rebuilt
    # graph dropped them as unused and shape inference failed on the branch
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(9)
    body = helper.make_graph([helper.make_node("MatMul", ["h", "Wb"], ["t"], name="in_body")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 16])])
    other = helper.make_graph([helper.make_node("Identity", ["h16"], ["e"], name="pass")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 16])])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["h"], name="fc2"),
             helper.make_node("MatMul", ["h", "W3"], ["h16"], name="fc3"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body, else_branch=other)]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 4, name)
             for name, shape in (("W1", (32, 64)), ("W2", (64, 32)), ("W3", (32, 16)), ("Wb", (32, 16)))]
    model = onnx.helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                          inits + [numpy_helper.from_array(np.array(True), "cond")]),
        opset_imports=[helper.make_opsetid("", 17)])
    result = prune.run(model, _params(sparsity=0.25, structure="channel", include=["W1"], min_params=0),
                       StepContext(original=model))
    assert_valid_same_io(result.model, model, inputs_for(model))
    assert _dims(result.model)["W1"] == (32, 48) and _dims(result.model)["Wb"] == (32, 16)


def test_channel_pruning_past_an_op_onnx_cannot_type():
    """GroupNormalization (opset 21) has no output type in ONNX's shape inference, so strict
    inference failed on the pruned model (exit 1) though it fails on the original just the same:
    the group it reads stays whole, the Conv pair after it is pruned, the model runs."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(5)
    arrays = {"w1": rng.standard_normal((16, 3, 3, 3)), "gs": rng.uniform(0.5, 1.5, 16), "gb": rng.standard_normal(16),
              "w2": rng.standard_normal((32, 16, 1, 1)), "w3": rng.standard_normal((4, 32, 1, 1))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["c1", "gs", "gb"], ["g"], name="norm", num_groups=4),
             helper.make_node("Relu", ["g"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    reasons = {s["name"]: s["reason"] for s in result.metrics["skipped"]}
    assert "GroupNormalization norm reads c1" in reasons["w1"]
    dims = _dims(result.model)
    assert dims["w1"] == (16, 3, 3, 3) and dims["w2"] == (16, 16, 1, 1) and dims["w3"] == (4, 16, 1, 1)
    assert_valid_same_io(result.model, model, {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)})


def test_channel_pruning_leaves_a_shared_weight_whole():
    """A weight two MatMuls read was split into a sliced copy per reader: the model grew (20433 ->
    21201 parameters) while the report said it shrank. Shared weights keep their channels."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "shared"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "shared"], ["a"], name="fc2"),
             helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "shared"], ["b"], name="fc3"),
             helper.make_node("Relu", ["b"], ["rb"], name="relu3"),
             helper.make_node("MatMul", ["rb", "w3"], ["y"], name="fc4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = prune.run(model, _params(sparsity=0.5, structure="channel", min_params=0),
                       StepContext(original=model, options={"channel_block": 1}))
    dims = _dims(result.model)
    assert dims["shared"] == (32, 32) and len(result.model.graph.initializer) == 3
    assert dims["w1"] == (16, 32)            # its channels meet the shared weight's rows
    assert any("shared by 2 readers" in s["reason"] for s in result.metrics["skipped"])
    params = sum(int(np.prod(t.dims)) for t in result.model.graph.initializer)
    assert params <= sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert_valid_same_io(result.model, model, {"x": rng.standard_normal((2, 16)).astype(np.float32)})
