"""prune: unstructured magnitude (layer / global), N:M, SparseGPT, and channel pruning."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.graph import get_array, weight_layers
from worker.pipeline.step import StepContext
from worker.pipeline.steps import prune

from .structure_models import assert_valid_same_io, attention, cnn, inputs_for, mlp, rel_l2, run_model


def _params(**fields):
    return parse_recipe({"steps": [{"op": "prune", **fields}]}).steps[0]


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
                assert ctx.layers[name].sparsity == pytest.approx(0.5, abs=0.02)
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
    with pytest.raises(RecipeError):
        prune.run(model, _params(sparsity=0.5, include=["nothing*"]), StepContext(original=model))


@pytest.mark.parametrize("fields,loc", [({"sparsity": 1.0}, ["steps", 0, "sparsity"]),
                                        ({"sparsity": 0.5, "structure": "4:2"}, ["steps", 0, "structure"]),
                                        ({"sparsity": -0.1}, ["steps", 0, "sparsity"])])
def test_bad_parameters_refused_with_field_paths(fields, loc):
    with pytest.raises(RecipeError) as info:
        _params(**fields)
    assert info.value.errors[0]["loc"] == loc
