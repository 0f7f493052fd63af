"""quantize.max_output_error: the loop moves the most sensitive layers up until the bound holds,
stops there, reports each move; a bound no build meets still gives a model and says it was missed."""
from __future__ import annotations

import onnx
import pytest

from core.recipe import parse_recipe
from worker.pipeline.runner import run
from tests.unit.pipeline.builders import rel_l2, run_ort
from tests.unit.pipeline.fragile import fragile_mlp, inputs

OPTIONS = {"latency_runs": 2, "layer_errors": False, "bound_samples": 64}


def _compress(tmp_path, model, step, **options):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "min_params": 16, **step}]})
    return run(path, recipe, calibration=inputs(64), workdir=tmp_path / "out", options={**OPTIONS, **options})


def test_int4_loop_lifts_the_fragile_layer_and_stops_at_the_bound(tmp_path):
    model = fragile_mlp(outlier=200.0)
    result = _compress(tmp_path, model, {"weights": {"bits": 4, "granularity": "block"}, "max_output_error": 0.3})
    mixed = result.report["steps"][0]["mixed_precision"]
    assert mixed["met"] and mixed["final_rel_l2"] <= 0.3 < mixed["initial_rel_l2"]
    moves = mixed["moves"]
    # int8 is not enough for the fragile layer (measured alone again at int8), so it goes on to float
    assert [(m["name"], m["to"]) for m in moves] == [("W1", "int8"), ("W1", "float")]
    # it stops at the first build that meets the bound: every earlier build was above it
    assert all(m["rel_l2_after"] > 0.3 for m in moves[:-1]) and moves[-1]["rel_l2_after"] <= 0.3
    assert all("bytes_cost" in m and "latency_cost_ms" in m for m in moves)
    out = onnx.load(result.model_path)
    bits = {row["name"]: row["bits"] for row in result.report["layers"]}
    assert bits["W0"] == bits["W2"] == bits["W3"] == 4           # the rest stays compressed
    higher = mixed["higher_precision"]["weights"]
    assert higher == {"W1": "float"} and bits.get("W1", 32) == 32
    data = inputs(64)
    assert rel_l2(run_ort(model, data)[0], run_ort(out, data)[0]) == pytest.approx(mixed["final_rel_l2"], rel=0.05)
    assert "Error bound of step 0" in (tmp_path / "out" / "report.html").read_text()


def test_static_int8_bound_moves_weights_and_activations_to_float(tmp_path):
    model = fragile_mlp(outlier=200.0)
    result = _compress(tmp_path, model, {"weights": {"bits": 8}, "activations": {"calibration": "minmax"},
                                         "max_output_error": 0.03})
    mixed = result.report["steps"][0]["mixed_precision"]
    assert mixed["met"] and mixed["final_rel_l2"] <= 0.03 < mixed["initial_rel_l2"]
    first = mixed["moves"][0]
    assert (first["name"], first["to"]) == ("W1", "float")
    # a float layer's input must not come out of a DequantizeLinear (ONNX Runtime would run it on int8)
    assert "a0" in first["with_activations"]
    bits = {row["name"]: row["bits"] for row in result.report["layers"]}
    assert [bits.get(w) for w in ("W0", "W2", "W3", "Wout")] == [8, 8, 8, 8]   # the rest stays int8


def test_a_bound_no_build_meets_keeps_the_best_model_and_says_so(tmp_path):
    model = fragile_mlp(outlier=200.0)
    # float meets any bound: a bound is missed when the builds run out before (here after 2)
    result = _compress(tmp_path, model, {"weights": {"bits": 4, "granularity": "block"}, "max_output_error": 1e-9},
                       max_bound_builds=2)
    mixed = result.report["steps"][0]["mixed_precision"]
    assert mixed["met"] is False and "MISSED" in mixed["summary"]
    assert mixed["final_rel_l2"] <= mixed["initial_rel_l2"] and mixed["builds"] == 3   # 2 trials, the final build
    assert "MISSED" in (tmp_path / "out" / "report.html").read_text()
    assert result.model_path.is_file()


def test_a_bound_only_float_meets_says_nothing_is_quantized(tmp_path):
    # met, at 1.02x: the summary said only "met" and a user read it as a quantized model
    model = fragile_mlp(outlier=200.0)
    result = _compress(tmp_path, model, {"weights": {"bits": 8}, "max_output_error": 1e-12})
    mixed = result.report["steps"][0]["mixed_precision"]
    assert mixed["met"] and set(mixed["higher_precision"]["weights"].values()) == {"float"}
    assert "nothing is quantized" in mixed["summary"]
    (tmp_path / "partial").mkdir()
    partial = _compress(tmp_path / "partial", model, {"weights": {"bits": 4, "granularity": "block"},
                                                      "max_output_error": 0.3})
    assert "nothing is quantized" not in partial.report["steps"][0]["mixed_precision"]["summary"]


def _embedding_then_linear() -> onnx.ModelProto:
    """ids -> Gather(table [100, 32]) -> MatMul(W [32, 64]): each table row has one spike of 30,
    so its int8 row grid (step 0.24) loses the rest of the row; W quantizes well."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 32)).astype(np.float32)
    table[np.arange(100), rng.integers(0, 32, 100)] = 30.0
    w = (rng.standard_normal((32, 64)) / 6).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
             helper.make_node("MatMul", ["rows", "W"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_static_loop_moves_an_embedding_table_too(tmp_path):
    # the tables were no candidates: the loop moved every other layer to float and ended there
    import numpy as np
    model = _embedding_then_linear()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {},
                                      "max_output_error": 0.01}]})
    data = {"ids": np.arange(100, dtype=np.int64)}
    result = run(path, recipe, calibration=data, workdir=tmp_path / "out", options=OPTIONS)
    mixed = result.report["steps"][0]["mixed_precision"]
    assert mixed["met"] and ("table", "float") in [(m["name"], m["to"]) for m in mixed["moves"]]
    bits = {row["name"]: row["bits"] for row in result.report["layers"]}
    assert bits["W"] == 8                  # what the bound allows stays int8
