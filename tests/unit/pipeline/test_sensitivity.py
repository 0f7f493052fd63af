"""Per-layer sensitivity: the one-session probe gives the same error as a model with only that layer
(or activation) compressed; the fragile layer ranks first; the runner reports it and writes the artifact."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from core.recipe import parse_recipe
from worker.pipeline import graph, sensitivity
from worker.pipeline.data import bind
from worker.pipeline.runner import run
from tests.unit.pipeline.builders import run_ort
from tests.unit.pipeline.fragile import fragile_mlp, inputs


def _step(spec: dict):
    return parse_recipe({"steps": [{"op": "quantize", **spec}]}).steps[0]


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(b, np.float64) - a) / np.linalg.norm(np.asarray(a, np.float64)))


def test_weight_probe_matches_a_model_with_that_weight_replaced_and_fragile_layer_ranks_first():
    model, data = fragile_mlp(), inputs(32)
    step = _step({"weights": {"bits": 4, "granularity": "tensor"}, "min_params": 16})
    found = sensitivity.measure(model, step, bind(model, data), samples=32)
    weights = found.ranked("weight")
    assert [e.name for e in weights][0] == "W1"
    assert {e.name for e in weights} == {"W0", "W1", "W2", "W3", "Wout"}
    assert found.samples == 32 and found.seconds > 0
    reference = run_ort(model, data)[0]
    for entry in weights:
        alone = onnx.ModelProto()
        alone.CopyFrom(model)
        layer = next(l for l in sensitivity.candidate_weights(alone, step) if l.weight == entry.name)
        graph.set_array(alone, entry.name, sensitivity.fake_quantize(graph.get_array(alone, entry.name), layer, step.weights))
        assert entry.error == pytest.approx(_rel(reference, run_ort(alone, data)[0]), rel=1e-4, abs=1e-7)
    assert weights[0].error > 2.5 * weights[1].error
    assert weights[0].exclude == ["W1"]


def test_activation_probe_matches_a_model_with_one_qdq():
    from worker.pipeline.quantize import static

    model, data = fragile_mlp(), inputs(32)
    step = _step({"activations": {"calibration": "minmax"}, "min_params": 16})
    found = sensitivity.measure(model, step, bind(model, data), samples=32)
    acts = found.ranked("activation")
    assert acts and all(e.exclude for e in acts)
    reference = run_ort(model, data)[0]
    entry = acts[0]
    one = onnx.ModelProto()
    one.CopyFrom(model)
    ranges = __import__("worker.pipeline.calibrate", fromlist=["calibrate"]).calibrate(one, bind(one, data), [entry.name])
    grid = static.activation_grid(one, entry.name, ranges[entry.name].lo, ranges[entry.name].hi, False)
    static.insert_qdq(one, entry.name, grid)
    graph.sort_graph(one)
    assert entry.error == pytest.approx(_rel(reference, run_ort(one, data)[0]), rel=1e-3, abs=1e-6)


def test_prune_sensitivity_zeroes_the_stated_fraction():
    model = fragile_mlp()
    step = parse_recipe({"steps": [{"op": "prune", "sparsity": 0.5, "structure": "2:4", "min_params": 16}]}).steps[0]
    layer = next(l for l in sensitivity.candidate_weights(model, step) if l.weight == "W2")
    pruned = sensitivity.fake_prune(graph.get_array(model, "W2"), layer, step)
    assert np.mean(pruned == 0) == pytest.approx(0.5)
    groups = pruned.T.reshape(64, 16, 4)          # along the input axis (rows of a MatMul weight)
    assert ((groups == 0).sum(axis=-1) == 2).all()
    found = sensitivity.measure(model, step, bind(model, inputs(16)), samples=16)
    assert len(found.entries) == 5 and all(e.error > 0 for e in found.entries)


def test_glob_escape_matches_only_the_name():
    import fnmatch
    name = "layer[0]*.weight?"
    assert fnmatch.fnmatchcase(name, sensitivity.glob_escape(name))
    assert not fnmatch.fnmatchcase("layer0x.weightz", sensitivity.glob_escape(name))


def test_runner_reports_sensitivity_and_writes_the_artifact(tmp_path):
    model = fragile_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    recipe = parse_recipe({"sensitivity": {"samples": 16},
                           "steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"},
                                      "min_params": 16}]})
    result = run(path, recipe, calibration=inputs(32), workdir=tmp_path / "out",
                 options={"latency_runs": 2, "layer_errors": False})
    rows = result.report["sensitivity"]
    assert rows[0]["samples"] == 16 and rows[0]["step"] == 0 and rows[0]["seconds"] > 0
    errors = [e["error"] for e in rows[0]["entries"]]
    assert errors == sorted(errors, reverse=True)
    saved = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert saved["steps"][0]["suggested_exclude"]
    assert "Sensitivity" in (tmp_path / "out" / "report.html").read_text()


def test_recipe_takes_sensitivity_as_a_flag_or_mapping_and_bound_needs_calibration():
    assert parse_recipe({"sensitivity": True, "steps": [{"op": "cleanup"}]}).sensitivity.samples == 32
    assert parse_recipe({"sensitivity": False, "steps": [{"op": "cleanup"}]}).sensitivity is None
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4}, "max_output_error": 0.05}]})
    assert recipe.needs_calibration() == ["steps.0.max_output_error"]


def test_a_probe_compares_the_outputs_whose_shape_held_and_the_float_ones():
    """An output whose row count depends on the data (NonMaxSuppression) failed the sensitivity
    analysis (operands could not be broadcast, exit 1): the probe measures the outputs whose shapes held."""
    from worker.pipeline.sensitivity import Probe, rel_l2

    class Session:
        def __init__(self, outputs):
            self.outputs = outputs

        def run(self, names, feeds):
            return self.outputs

    reference = [np.ones((4, 3), np.float32), np.ones((5, 2), np.float32), np.arange(4, dtype=np.int64)]
    changed = [np.full((4, 3), 1.1, np.float32), np.ones((7, 2), np.float32), np.arange(4, dtype=np.int64)[::-1].copy()]
    probe = Probe(Session(changed), [{}], [reference], ["scores", "boxes", "labels"])
    assert probe.error({}, rel_l2) == pytest.approx(0.1, rel=1e-5)
