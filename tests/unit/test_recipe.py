"""Recipe validation: docs/recipes.md fields, refused before any work with the field's path."""
import json

import pytest

from core.errors import RecipeError
from core.recipe import PruneStep, QuantizeStep, parse_recipe

FULL = """
steps:
  - op: cleanup
  - op: prune
    method: magnitude
    sparsity: 0.5
    structure: unstructured
    scope: global
  - op: lowrank
    rank_ratio: 0.5
  - op: cluster
    bits: 4
  - op: quantize
    weights: {bits: 8, symmetric: true, granularity: channel}
    activations: {bits: 8, calibration: minmax}
    method: rtn
  - op: distill
    method: layerwise
    temperature: 4.0
    epochs: 3
  - op: fp16
"""


def test_contract_example_parses_from_yaml_and_json():
    recipe = parse_recipe(FULL)
    assert [step.op for step in recipe.steps] == ["cleanup", "prune", "lowrank", "cluster", "quantize", "distill", "fp16"]
    again = parse_recipe(json.dumps(recipe.model_dump(mode="json")))
    assert again == recipe
    assert recipe.steps[1].min_params == 1024


def test_block_defaults_and_nm():
    recipe = parse_recipe({"steps": [{"op": "prune", "sparsity": 0.5, "structure": "2:4"},
                                     {"op": "quantize", "weights": {"bits": 4, "granularity": "block"}}]})
    prune, quantize = recipe.steps
    assert isinstance(prune, PruneStep) and prune.n_m == (2, 4)
    assert isinstance(quantize, QuantizeStep) and quantize.weights.block_size == 32


@pytest.mark.parametrize("step, path", [
    ({"op": "foo"}, ["steps", 0, "op"]),
    ({"sparsity": 0.5}, ["steps", 0, "op"]),
    ({"op": "prune", "sparsity": 1.0}, ["steps", 0, "sparsity"]),
    ({"op": "prune", "sparsity": 1.5}, ["steps", 0, "sparsity"]),
    ({"op": "prune", "sparsity": float("nan")}, ["steps", 0, "sparsity"]),
    ({"op": "prune", "sparsity": 0.5, "structure": "4:2"}, ["steps", 0, "structure"]),
    ({"op": "prune", "sparsity": 0.5, "bogus": 1}, ["steps", 0, "bogus"]),
    ({"op": "quantize", "weights": {"bits": 0}}, ["steps", 0, "weights", "bits"]),
    ({"op": "quantize", "weights": {"bits": 4, "granularity": "block", "block_size": 48}}, ["steps", 0, "weights", "block_size"]),
    ({"op": "lowrank", "rank_ratio": 0}, ["steps", 0, "rank_ratio"]),
    ({"op": "lowrank"}, ["steps", 0]),
    ({"op": "cluster", "bits": 9}, ["steps", 0, "bits"]),
    ({"op": "quantize", "method": "gptq", "weights": {"bits": 1}}, ["steps", 0]),
    ({"op": "prune", "sparsity": 0.5, "include": ["x" * 1000]}, ["steps", 0, "include", 0]),
])
def test_bad_steps_name_the_field(step, path):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"steps": [step]})
    assert caught.value.errors[0]["loc"] == path
    assert caught.value.status == 422


@pytest.mark.parametrize("source", ["[1, 2]", "steps: [", "", {"steps": []}, {"steps": [{"op": "fp16"}] * 100}])
def test_malformed_recipes_are_refused(source):
    with pytest.raises(RecipeError):
        parse_recipe(source)


def test_calibration_requirements_are_named():
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4}, "method": "gptq"},
                                     {"op": "quantize", "activations": {"calibration": "dynamic"}}]})
    assert recipe.needs_calibration() == ["steps.0.method"]


def test_static_int8_after_fp16_is_refused_at_its_activations():
    # it failed mid-job in ONNX Runtime (float16 layers meet float32 Q/DQ); weight-only and dynamic
    # after fp16 run or refuse on their own
    with pytest.raises(RecipeError) as info:
        parse_recipe({"steps": [{"op": "fp16"}, {"op": "cleanup"},
                                {"op": "quantize", "weights": {"bits": 8}, "activations": {}}]})
    assert info.value.errors[0]["loc"] == ["steps", 2, "activations"] and "steps.0 (fp16)" in str(info.value)
    parse_recipe({"steps": [{"op": "fp16"}, {"op": "quantize", "weights": {"bits": 4, "granularity": "block"}}]})
    parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {}}, {"op": "fp16"}]})


def test_an_n_m_pattern_sets_the_sparsity():
    # "3:8" keeps 3 of every 8 (sparsity 0.625); a different sparsity given was silently ignored
    step = parse_recipe({"steps": [{"op": "prune", "sparsity": 0, "structure": "3:8"}]}).steps[0]
    assert step.n_m == (3, 8) and step.sparsity == 0.625
    parse_recipe({"steps": [{"op": "prune", "sparsity": 0.5, "structure": "2:4"}]})
    with pytest.raises(RecipeError) as info:
        parse_recipe({"steps": [{"op": "prune", "sparsity": 0.375, "structure": "3:8"}]})
    assert "that pattern's sparsity is 0.625" in str(info.value) and info.value.errors[0]["loc"][:2] == ["steps", 0]


def test_kd_after_fp16_is_refused_at_its_method():
    # it failed mid-job in the trainer (float16 weights in float32 layers); layerwise runs after fp16
    with pytest.raises(RecipeError) as info:
        parse_recipe({"steps": [{"op": "fp16"}, {"op": "distill", "method": "kd"}]})
    assert info.value.errors[0]["loc"] == ["steps", 1, "method"]
    parse_recipe({"steps": [{"op": "fp16"}, {"op": "distill", "method": "layerwise"}]})
    parse_recipe({"steps": [{"op": "distill", "method": "kd"}, {"op": "fp16"}]})


@pytest.mark.parametrize("weights", [{"bits": 4, "block_size": 32}, {"bits": 4, "granularity": "block", "block_size": 48}])
def test_a_block_size_refusal_names_the_block_size(weights):
    with pytest.raises(RecipeError) as info:
        parse_recipe({"steps": [{"op": "quantize", "weights": weights}]})
    assert info.value.errors[0]["loc"] == ["steps", 0, "weights", "block_size"]
