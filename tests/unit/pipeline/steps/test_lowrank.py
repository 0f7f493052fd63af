"""lowrank: truncated SVD of MatMul / Gemm weights, channel and spatial Conv factorization."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.graph import get_array, set_array
from worker.pipeline.step import StepContext
from worker.pipeline.steps import lowrank

from .structure_models import mlp_fp16, assert_valid_same_io, attention, cnn, inputs_for, mlp, rel_l2, run_model


def _params(**fields):
    return parse_recipe({"steps": [{"op": "lowrank", **fields}]}).steps[0]


def _params_of(model, ops=("MatMul", "Gemm")):
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(inits[n.input[1]] for n in model.graph.node if n.op_type in ops and n.input[1] in inits)


def test_rank_ratio_half_halves_linear_parameters():
    model = mlp()
    ctx = StepContext(original=model)
    result = lowrank.run(model, _params(rank_ratio=0.5, min_params=0), ctx)
    feeds = inputs_for(model)
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert rel_l2(got, run_model(model, feeds)[0]) < 0.8
    assert _params_of(result.model) <= 0.5 * _params_of(model)
    assert result.metrics["param_ratio"] <= 0.5
    for name, (k, n) in {"w1": (64, 128), "w2": (128, 64), "w3": (64, 10)}.items():
        rank = int(np.floor(0.5 * k * n / (k + n)))
        assert ctx.layers[name].rank == rank
        a, b = (get_array(result.model, f) for f in ctx.layers[name].factors)
        assert a.shape == (k, rank) and b.shape == (rank, n)
    assert {n.op_type for n in result.model.graph.node} == {"MatMul", "Add", "Relu", "Gemm"}


def test_exact_low_rank_weight_is_reproduced():
    model = mlp()
    rng = np.random.default_rng(5)
    set_array(model, "w1", (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 128)) / 8).astype(np.float32))
    ctx = StepContext(original=model)
    result = lowrank.run(model, _params(energy=0.999999, include=["w1"]), ctx)
    assert ctx.layers["w1"].rank == 4
    feeds = inputs_for(model)
    np.testing.assert_allclose(assert_valid_same_io(result.model, model, feeds)[0], run_model(model, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_energy_picks_the_smallest_rank_reaching_it():
    model = mlp()
    w2 = get_array(model, "w2").astype(np.float64)
    s = np.linalg.svd(w2, compute_uv=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    want = int(np.searchsorted(share, 0.6) + 1)
    ctx = StepContext(original=model)
    result = lowrank.run(model, _params(energy=0.6, include=["w2"]), ctx)
    assert ctx.layers["w2"].rank == want
    assert result.metrics["layers"][0]["energy"] >= 0.6 > share[want - 2]


def test_no_saving_means_left_alone_and_reported():
    model = mlp()
    result = lowrank.run(model, _params(energy=1.0, min_params=0), StepContext(original=model))
    assert result.changed == []
    assert {s["name"] for s in result.metrics["skipped"]} == {"w1", "w2", "w3"}
    feeds = inputs_for(model)
    np.testing.assert_array_equal(assert_valid_same_io(result.model, model, feeds)[0], run_model(model, feeds)[0])


def test_attention_block_factorizes_and_runs():
    model = attention()
    ctx = StepContext(original=model)
    result = lowrank.run(model, _params(rank_ratio=0.5, min_params=0), ctx)
    assert_valid_same_io(result.model, model, inputs_for(model))
    assert {ctx.layers[n].rank for n in ("wq", "wk", "wv", "wo")} == {8}
    assert ctx.layers["w_up"].rank == ctx.layers["w_down"].rank == int(0.5 * 32 * 128 / 160)


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_conv_factorization_is_exact_on_a_low_rank_kernel(mode):
    model = cnn()
    rng = np.random.default_rng(2)
    o, i, k, r = 32, 16, 3, 3
    if mode == "channel":
        w = (rng.standard_normal((o, r)) @ rng.standard_normal((r, i * k * k))).reshape(o, i, k, k)
    else:
        m = rng.standard_normal((i * k, r)) @ rng.standard_normal((r, o * k))        # M[(i, y), (o, x)]
        w = m.reshape(i, k, o, k).transpose(2, 0, 1, 3)
    set_array(model, "conv4_w", (w / 20).astype(np.float32))
    ctx = StepContext(original=model)
    result = lowrank.run(model, _params(energy=0.99999, conv=mode, include=["conv4_w"]), ctx)
    assert ctx.layers["conv4_w"].rank == r
    first, second = (get_array(result.model, f) for f in ctx.layers["conv4_w"].factors)
    assert first.shape == ((r, i, k, k) if mode == "channel" else (r, i, k, 1))
    assert second.shape == ((o, r, 1, 1) if mode == "channel" else (o, r, 1, k))
    feeds = inputs_for(model)
    np.testing.assert_allclose(assert_valid_same_io(result.model, model, feeds)[0], run_model(model, feeds)[0],
                               rtol=1e-3, atol=1e-4)


def test_strided_padded_spatial_conv_matches():
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    m = rng.standard_normal((4 * 5, 2)) @ rng.standard_normal((2, 6 * 3))
    w = m.reshape(4, 5, 6, 3).transpose(2, 0, 1, 3).astype(np.float32)        # [O=6, I=4, kh=5, kw=3]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=[2, 3], pads=[2, 1, 1, 0],
                            dilations=[2, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 17, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.arange(6, dtype=np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = lowrank.run(model, _params(energy=0.999999, conv="spatial", min_params=0), StepContext(original=model))
    feeds = {"x": rng.standard_normal((1, 4, 17, 13)).astype(np.float32)}
    np.testing.assert_allclose(run_model(result.model, feeds)[0], run_model(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_randomized_svd_is_near_optimal():
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((1100, 60)) * np.logspace(0, -3, 60)) @ rng.standard_normal((60, 1000))
    u, s, vt = lowrank.randomized_svd(matrix, 20)
    exact = np.linalg.svd(matrix, compute_uv=False)
    np.testing.assert_allclose(s, exact[:20], rtol=1e-6)
    residual = np.linalg.norm(matrix - (u * s) @ vt)
    assert residual <= 1.001 * np.sqrt(np.sum(exact[20:] ** 2))


@pytest.mark.parametrize("fields,loc", [({"rank_ratio": 0}, ["steps", 0, "rank_ratio"]),
                                        ({"rank_ratio": 1.5}, ["steps", 0, "rank_ratio"]),
                                        ({"energy": 0.0}, ["steps", 0, "energy"])])
def test_bad_parameters_refused_with_field_paths(fields, loc):
    with pytest.raises(RecipeError) as info:
        _params(**fields)
    assert info.value.errors[0]["loc"] == loc


def test_both_or_neither_budget_refused():
    with pytest.raises(RecipeError):
        _params(rank_ratio=0.5, energy=0.9)
    with pytest.raises(RecipeError):
        _params()


def test_calibration_makes_the_factorization_data_aware():
    """With calibration data the factors minimise the layer's output error on it: on inputs with
    correlated, unequal-scale features the outputs are closer than with the plain SVD."""
    rng = np.random.default_rng(7)
    for build, shape, mix_dim in ((mlp, (512, 64), 64), (cnn, (48, 3, 16, 16), None)):
        model = build()
        if mix_dim:
            mix = rng.standard_normal((mix_dim, mix_dim)) * np.logspace(-2, 0.5, mix_dim)[:, None]
            draw = lambda n: (rng.standard_normal((n, mix_dim)) @ mix).astype(np.float32)  # noqa: E731
        else:
            draw = lambda n: (rng.standard_normal((n,) + shape[1:]) * np.array([3.0, 0.3, 0.03])[:, None, None]).astype(np.float32)  # noqa: E731
        calibration, feeds = {"x": draw(shape[0])}, {"x": draw(64)}
        want = run_model(model, feeds)[0]
        errors = []
        for data in (None, calibration):
            ctx = StepContext(original=model, calibration=data)
            result = lowrank.run(model, _params(rank_ratio=0.3, min_params=0), ctx)
            errors.append(rel_l2(assert_valid_same_io(result.model, model, feeds)[0], want))
        assert errors[1] < 0.8 * errors[0], (build.__name__, errors)


def test_float16_weights_keep_their_dtype():
    model = mlp_fp16()
    result = lowrank.run(model, parse_recipe({"steps": [{"op": "lowrank", **{"rank_ratio": 0.5, "min_params": 0}}]}).steps[0], StepContext(original=model))
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)}
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert got.dtype == np.float16
    assert {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)} == {10}


def test_energy_means_the_weights_rank_with_calibration_data_too():
    # with calibration data the rank came off the output-weighted spectrum: inputs dominated by one
    # direction put nearly all the output energy in rank 1 and the layer collapsed
    model = mlp()
    rng = np.random.default_rng(8)
    u, _, vt = np.linalg.svd(rng.standard_normal((64, 128)), full_matrices=False)
    set_array(model, "w1", ((u * np.logspace(0, -2, 64)) @ vt).astype(np.float32))   # a decaying spectrum
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, 5] *= 200.0                                     # an outlier feature, as in BERT
    feeds = {"x": (rng.standard_normal((64, 64)) * np.where(np.arange(64) == 5, 200.0, 1.0)).astype(np.float32)}
    want = run_model(model, feeds)[0]
    ranks, errors = [], []
    for data in (None, {"x": x}):
        ctx = StepContext(original=model, calibration=data)
        result = lowrank.run(model, _params(energy=0.9, include=["w1"]), ctx)
        ranks.append(ctx.layers["w1"].rank)
        errors.append(rel_l2(assert_valid_same_io(result.model, model, feeds)[0], want))
        assert result.metrics["layers"][0]["energy"] <= 1.0
    assert ranks[0] == ranks[1] > 1
    assert errors[1] <= errors[0]
