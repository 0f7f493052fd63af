"""A job's cost profile (worker.pipeline.cost): phases per step that add up to no more than the step,
peak memory, the slowest phase in report.json, report.html and the CLI's line; progress stages that
name the layer, the phase and an ETA; and memory that stays bounded with many calibration samples
(measured in a subprocess as RSS growth, never as time)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from core.recipe import Recipe
from tests.unit.pipeline.builders import mlp
from worker.pipeline import runner
from worker.pipeline.cost import CostMeter, LayerClock

ROOT = Path(__file__).resolve().parents[3]


def _sparsegpt_job(tmp_path):
    model = mlp(inputs=32, hidden=64, classes=8)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((96, 32)).astype(np.float32)
    recipe = Recipe.model_validate({"steps": [{"op": "prune", "method": "sparsegpt", "sparsity": 0.5, "min_params": 0},
                                              {"op": "quantize", "method": "gptq", "min_params": 0,
                                               "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]})
    stages: list[str] = []
    result = runner.run(path, recipe, calibration={"x": x}, workdir=tmp_path / "out",
                        progress=lambda fraction, stage: stages.append(stage),
                        options={"latency_runs": 2})
    return result, stages


def test_profile_fields_present_and_consistent(tmp_path):
    result, stages = _sparsegpt_job(tmp_path)
    report = result.report
    for step in report["steps"]:
        phases = step["phases"]
        assert {"capture", "statistics", "solve"} <= set(phases), phases
        assert sum(phases.values()) <= step["seconds"] * 1.001 + 1e-3
        assert all(value >= 0 for value in phases.values())
        assert sum(v for k, v in step["phases_cpu"].items()) <= step["cpu_seconds"] * 1.001 + 1e-3
        assert step["peak_rss_bytes"] > 0
        assert step["slowest_phase"] == max(phases, key=phases.get)
    slowest = report["cost"]["slowest_phase"]
    best = max(((i, p, s) for i, step in enumerate(report["steps"]) for p, s in step["phases"].items()),
               key=lambda item: item[2])
    assert (slowest["step"], slowest["phase"]) == best[:2]
    assert report["cost"]["peak_rss_bytes"] >= max(step["peak_rss_bytes"] for step in report["steps"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Cost</h2>" in html and f"Slowest phase: step {slowest['step'] + 1}" in html
    json.dumps(report, allow_nan=False)


def test_progress_names_layer_phase_and_eta(tmp_path):
    _, stages = _sparsegpt_job(tmp_path)
    layered = [s for s in stages if re.search(r"layer \d+/\d+ \S+: (capture|solve)", s)]
    assert any(s.startswith("step 1/2: prune: layer 1/") for s in layered)
    assert any(s.startswith("step 2/2: quantize: layer ") for s in layered)
    assert any(re.search(r", ETA \d+ s$", s) for s in layered)          # once a layer is done
    assert not re.search(r"ETA", next(s for s in layered if "layer 1/" in s))   # none before


def test_nested_phases_are_not_counted_twice():
    meter = CostMeter()
    meter.start()
    with meter.phase("statistics"):
        with meter.phase("capture"):
            time.sleep(0.02)
        time.sleep(0.01)
    row = meter.row()
    assert row["phases"]["capture"] >= 0.02
    assert 0.005 <= row["phases"]["statistics"] < 0.02 + 0.01
    assert sum(row["phases"].values()) <= time.perf_counter() - meter.started + 1e-3


def test_layer_clock_eta_from_layers_done():
    seen = []
    clock = LayerClock(4, lambda fraction, stage: seen.append((fraction, stage)))
    clock.started -= 10.0                 # as if the first two layers took 10 s
    clock.tick(2, "fc3", "solve")
    assert seen[-1][0] == 0.5 and seen[-1][1] == "layer 3/4 fc3: solve, ETA 10 s"


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper
    from worker.pipeline import cost, sessions
    from worker.pipeline.step import StepContext
    job, samples = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    width, depth, tokens = (64, 3, 128) if job == "sparsegpt" else (16, 8, 4096)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [f"r{i}", "x"], [f"h{i}"], name=f"res{i}")]
        cur = f"h{i}"
    shape = ["batch", tokens, width]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((samples, tokens, width)).astype(np.float32)
    ctx = StepContext(original=model, calibration={"x": x},
                      options={"propagation_budget_bytes": 16 << 20, "capture_budget_bytes": 16 << 20})
    # the steps (and scipy's LAPACK, which their solves load) imported before the baseline: a
    # module's code is a constant, not growth with the data
    from worker.pipeline.steps import prune, quantize
    import scipy.linalg, threadpoolctl  # noqa: F401,E401  (the pipeline imports them where they solve)
    sessions.release_memory()
    cost.reset_peak()
    before = cost.rss_bytes()
    if job == "sparsegpt":
        prune.run(model, prune.Params(op="prune", method="sparsegpt", sparsity=0.5, min_params=0), ctx)
    else:
        quantize.run(model, quantize.Params(op="quantize", weights={"bits": 8, "granularity": "channel"},
                                            activations={"bits": 8, "calibration": "percentile"}, min_params=0), ctx)
    print(json.dumps({"growth": cost.peak_rss_bytes() - before, "data": int(x.nbytes)}))
""")


def _growth(job: str, samples: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, job, str(samples)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sparsegpt_memory_stays_bounded_with_many_samples():
    """3000 samples of 128 x 64: every layer's output over the set is 98 MB, and two propagations
    (the original and the pruned model) each carry one or two of them; held within the 16 MB budget
    (the rest spilled), the growth stays far below what holding them would take."""
    found = _growth("sparsegpt", 3000)
    assert found["growth"] < 120 << 20, found


def test_static_calibration_memory_stays_bounded():
    """64 samples of 4096 x 16: 8 layers' tensors of one 64-sample batch are ~270 MB together;
    batches sized to the 16 MB capture budget keep the growth well below that."""
    found = _growth("static", 64)
    assert found["growth"] < 120 << 20, found


def test_remove_initializers_in_place_keeps_the_order_of_the_rest():
    from onnx import helper, numpy_helper

    from worker.pipeline import graph

    tensors = [numpy_helper.from_array(np.full(3, i, np.float32), f"w{i}") for i in range(6)]
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=tensors))
    graph.remove_initializers(model, ["w1", "w4", "absent"])
    assert [t.name for t in model.graph.initializer] == ["w0", "w2", "w3", "w5"]
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[2]), np.full(3, 3, np.float32))


def test_value_counts_matches_unique_for_every_integer_width():
    from worker.pipeline.quantize.sparse_storage import fill_value, value_counts

    rng = np.random.default_rng(3)
    for dtype in (np.int8, np.uint8, np.int16, np.int32, np.float32):
        values = (rng.normal(size=5000) * 40).astype(dtype)
        found, expected = value_counts(values), np.unique(values, return_counts=True)
        assert found[0].dtype == expected[0].dtype
        np.testing.assert_array_equal(found[0], expected[0])
        np.testing.assert_array_equal(found[1], expected[1])
    # ties go to the value nearest zero
    assert fill_value(np.array([-3, -3, 2, 2, 7], np.int8)) == 2
