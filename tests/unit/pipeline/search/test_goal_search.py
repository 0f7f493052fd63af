"""The goal search on a model with one fragile layer: the budget holds on the evaluation data, the
fragile layer ends at higher precision and the rest compressed, the time budget ends it with the
best verified model, cancel stops it, and with calibration data only part of it is held out."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from core.recipe import parse_recipe
from worker.pipeline.data import bind
from worker.pipeline.runner import run
from worker.pipeline.search import engine, scores, space
from worker.pipeline.step import StepCancelled, StepContext
from tests.unit.pipeline.builders import run_ort
from tests.unit.pipeline.fragile import fragile_mlp, inputs

OPTIONS = {"latency_runs": 2, "layer_errors": False}
GOAL = {"metric": "cosine", "max_drop": 0.001, "time_budget_s": 120}


def _run(tmp_path, goal=GOAL, evaluation=True, **kwargs):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(), path)
    return run(path, parse_recipe({"goal": goal}), calibration=inputs(64), workdir=tmp_path / "out",
               evaluation=inputs(48, seed=7) if evaluation else None, options=OPTIONS, **kwargs)


def test_budget_met_on_evaluation_data_and_fragile_layer_kept_at_higher_precision(tmp_path):
    result = _run(tmp_path)
    goal, candidates = result.report["goal"], result.report["candidates"]
    assert goal["met"] and goal["evaluation_samples"] == 48
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["verified"] and chosen["drop"] <= 0.001
    # measured again here, independently of the search
    evaluation = inputs(48, seed=7)
    y, z = run_ort(fragile_mlp(), evaluation)[0], run_ort(onnx.load(result.model_path), evaluation)[0]
    assert scores.value(parse_recipe({"goal": GOAL}).goal, y, z) >= 1 - 0.001
    # the fragile layer above the family's setting, every other layer compressed
    assert chosen["higher_precision"]["weights"].get("W1") in ("int8", "float")
    bits = {row["name"]: row["bits"] for row in result.report["layers"]}
    assert all(bits[w] <= 8 for w in ("W0", "W2", "W3"))
    assert result.report["size_ratio"] > 1.5
    # a frontier: several verified points, the chosen one marked, the next best downloadable
    assert sum(c["verified"] and c["pareto"] for c in candidates) >= 3
    assert sorted(c["artifact"] for c in candidates if c["artifact"])[:1] == ["candidate-1"]
    saved = onnx.load(tmp_path / "out" / "candidate-1.onnx")
    assert run_ort(saved, evaluation)[0].shape == y.shape
    # the frontier lists the files' own bytes: the chosen model.onnx and the downloadable candidate
    # (sizes were measured before finalize's lossless changes: a ViT's 353,378 against 326,021)
    listed = {c["artifact"]: c["bytes"] for c in candidates if c["artifact"]}
    assert (tmp_path / "out" / "candidate-1.onnx").stat().st_size == listed["candidate-1"]
    assert (tmp_path / "out" / "model.onnx").stat().st_size == chosen["bytes"]
    assert "Goal search" in (tmp_path / "out" / "report.html").read_text()
    # minimizing size: the weight-only DequantizeLinear nodes stay (not the larger Cast / Mul form),
    # by the goal's choice, not by a latency measurement
    row = next(r for r in result.report["steps"] if r["op"] == "goal")
    assert row["dequantize_form"]["form"] == "qdq"
    assert "reason" in row["dequantize_form"] or not row["dequantize_form"]["weights"]


def test_calibration_only_holds_part_out_and_says_so(tmp_path):
    result = _run(tmp_path, evaluation=False)
    goal = result.report["goal"]
    assert goal["evaluation_samples"] == 16 and "held out the last 16 of 64" in goal["evaluation_data"]
    # 16 samples cannot see a drop of 0.001: the report says so
    assert any("has 16 samples, fewer than 1 / max_drop = 1000" in note for note in goal["notes"])
    assert result.report["fidelity_data"] == "evaluation" and result.report["fidelity_samples"] == 16


def test_time_budget_ends_the_search_with_the_best_verified_model(tmp_path):
    model = fragile_mlp()
    data = bind(model, inputs(64))
    ctx = StepContext(original=model, calibration=data.arrays)
    goal = parse_recipe({"goal": {**GOAL, "time_budget_s": 40}}).goal
    ticks = itertools.count()

    def clock() -> float:       # every look at the clock costs a second: the budget runs out mid-search
        return float(next(ticks))

    search = engine.Search(model, model, goal, space.default_families(True), ctx, bind(model, inputs(48, seed=7)),
                           tmp_path / "s", clock=clock)
    search.run()
    result = search.finish(tmp_path)
    assert search.stopped and "time budget" in search.stopped
    unlimited = engine.Search(model, model, parse_recipe({"goal": GOAL}).goal, space.default_families(True), ctx,
                              bind(model, inputs(48, seed=7)), tmp_path / "u")
    unlimited.run()
    assert 1 <= len(search.candidates) < len(unlimited.candidates)
    verified = [c for c in search.candidates if c.verified]
    assert result.chosen in verified
    meeting = [c for c in verified if c.meets]
    assert result.chosen.bytes == min(c.bytes for c in meeting)
    assert "time budget" in result.goal_report["summary"]


def test_cancel_stops_the_search(tmp_path):
    seen = []
    flag = {"cancel": False}

    def progress(fraction, stage):
        seen.append(stage)
        if "3 verified" in stage:
            flag["cancel"] = True

    with pytest.raises(StepCancelled):
        _run(tmp_path, progress=progress, cancelled=lambda: flag["cancel"])
    assert any("3 verified" in s for s in seen)
    assert not any("6 verified" in s for s in seen)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_build_that_runs_past_the_deadline_is_stopped_and_the_best_so_far_returned(tmp_path, monkeypatch):
    model = fragile_mlp()
    ctx = StepContext(original=model, calibration=bind(model, inputs(64)).arrays)
    now = [0.0]
    goal = parse_recipe({"goal": GOAL}).goal
    search = engine.Search(model, model, goal, space.default_families(True), ctx, bind(model, inputs(48, seed=7)),
                           tmp_path / "s", clock=lambda: now[0])
    real_build = space.build

    def slow_gptq(model, family, assignment, ctx):
        if family.name == space.GPTQ_FAMILY:
            now[0] = 10 * goal.time_budget_s        # the build started in time, the clock ran out inside it
        return real_build(model, family, assignment, ctx)

    monkeypatch.setattr(space, "build", slow_gptq)
    search.run()
    result = search.finish(tmp_path)
    assert "that build stopped" in search.stopped and space.GPTQ_FAMILY in search.stopped
    assert not any(c.family == space.GPTQ_FAMILY for c in search.candidates)
    # the families built before it are candidates, and the best verified one is returned
    assert len([c for c in search.candidates if c.verified]) >= 3 and result.chosen.verified


@pytest.mark.parametrize("max_drop, twin_built", [(100.0, False), (0.0, True)])
def test_a_family_whose_twin_already_loses_is_not_built(tmp_path, max_drop, twin_built):
    model = fragile_mlp()
    ctx = StepContext(original=model, calibration=bind(model, inputs(64)).arrays)
    int8 = next(f for f in space.default_families(True) if f.name == "weight-only int8")
    families = [int8, space.Family("fp16", None),
                space.Family("same grid", int8.params.model_copy(update={
                    "method": "gptq", "weights": int8.params.weights.model_copy(update={"scale_search": "mse"})}),
                    twin=int8.name)]
    # rel_l2 100: every build meets (int8 first, the smallest); 0: none does, the twin may still
    goal = parse_recipe({"goal": {**GOAL, "metric": "rel_l2", "max_drop": max_drop}}).goal
    search = engine.Search(model, model, goal, families, ctx, bind(model, inputs(48, seed=7)), tmp_path / "s")
    search.run()
    built = {c.family for c in search.candidates}
    assert ("same grid" in built) == twin_built
    # skipped only where a candidate no larger than the twin meets the budget
    assert any("same grid: not built" in n for n in search.notes) == (not twin_built)
    if twin_built:
        # both relaxed per layer on one set of measurements: the second family's were all reused
        measured = [n for n in search.notes if "drop alone at each level" in n]
        assert len(measured) == 2 and any(" 0 measured" in n for n in measured), measured


@pytest.mark.parametrize(("goal", "loc"), [
    ({"metric": "cosine", "output": "nope"}, ["goal", "output"]),
    ({"metric": "accuracy"}, ["goal", "metric"]),
])
def test_goal_that_does_not_fit_is_refused_before_work(tmp_path, goal, loc):
    from core.errors import RecipeError
    with pytest.raises(RecipeError) as caught:
        _run(tmp_path, goal=goal)
    assert caught.value.errors[0]["loc"] == loc


def test_metrics_on_known_values():
    def spec(metric, **extra):
        return parse_recipe({"goal": {"metric": metric, **extra}}).goal

    y = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 2.0, 0.0], [0.5, 0.1, 0.2]])
    assert scores.value(spec("cosine"), y, y) == pytest.approx(1.0)
    assert scores.value(spec("top1_agreement"), y, y[:, [2, 1, 0]]) == pytest.approx(0.25)
    assert scores.value(spec("iou", threshold=1.5), y, y) == 1.0
    assert scores.value(spec("iou", threshold=1.5), y, np.where(y > 2.5, 0, y)) == pytest.approx(3 / 4)
    assert scores.value(spec("decision_agreement", threshold=1.5), y, np.zeros_like(y)) == pytest.approx(8 / 12)
    assert scores.value(spec("spearman"), y, 2 * y) == pytest.approx(1.0)
    assert scores.value(spec("rel_l2"), y, 1.1 * y) == pytest.approx(0.1)
    assert scores.value(spec("accuracy"), y, y, np.array([2, 1, 0, 1])) == pytest.approx(0.75)
    assert scores.quality(spec("rel_l2"), 0.1) == -0.1


def test_built_candidates_keep_the_original_io_annotations():
    from onnx import helper

    source = fragile_mlp()
    built = onnx.ModelProto()
    built.CopyFrom(source)
    built.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "Div_dim_1"]))
    space.keep_io_annotations(source, built)
    assert built.graph.output[0] == source.graph.output[0]


@pytest.mark.parametrize("samples, max_drop, warned", [(48, 0.1, False), (8, 0.1, True), (8, 0.0, False)])
def test_evaluation_data_too_small_for_max_drop_is_noted(tmp_path, samples, max_drop, warned):
    model = fragile_mlp()
    ctx = StepContext(original=model, calibration=bind(model, inputs(64)).arrays)
    goal = parse_recipe({"goal": {**GOAL, "max_drop": max_drop}}).goal
    search = engine.Search(model, model, goal, space.default_families(True)[:1], ctx,
                           bind(model, inputs(samples, seed=7)), tmp_path / "s")
    assert any("fewer than 1 / max_drop" in note for note in search.notes) == warned


@pytest.mark.parametrize("metric, extra", [("cosine", {}), ("top1_agreement", {}), ("rel_l2", {}),
                                           ("iou", {"threshold": 0.5}), ("decision_agreement", {"threshold": 0.5}),
                                           ("accuracy", {})])
def test_per_sample_parts_add_up_to_the_metric(metric, extra):
    # the bootstrap resamples per-sample sums: over every sample once they are the metric itself
    goal = parse_recipe({"goal": {"metric": metric, **extra}}).goal
    rng = np.random.default_rng(3)
    y = rng.normal(size=(12, 5))
    z = y + rng.normal(scale=0.4, size=y.shape)
    labels = rng.integers(0, 5, size=12)
    every = np.arange(12)[None, :]
    parts = scores._per_sample(goal, y, z, labels)
    if metric == "rel_l2":
        reference, error = parts
        drop = float(np.sqrt(scores._ratio(error, reference, every)[0]))
    else:
        (o_num, o_den), (c_num, c_den) = parts
        drop = float(scores._ratio(o_num, o_den, every)[0] - scores._ratio(c_num, c_den, every)[0])
    scorer = scores.Scorer(goal, y, labels)
    assert drop == pytest.approx(scorer.score(z)[1])


def test_ranks_average_ties():
    assert scores._ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 0.0, 1.5, 1.5]


@pytest.mark.parametrize("metric, few, many", [("top1_agreement", (16, 1), (400, 25)), ("spearman", (48, 1), (128, 2))])
def test_drop_bound_is_wide_on_few_samples_and_tight_on_many(metric, few, many):
    """One sample of a few changed: the drop is within a 0.1 budget, but so few samples cannot show
    that it holds, so the candidate does not meet; on many samples with about the same drop it does."""
    goal = parse_recipe({"goal": {"metric": metric, "max_drop": 0.1}}).goal
    rng = np.random.default_rng(0)

    def pair(n, changed):
        y = rng.normal(size=(n, 8))
        z = y.copy()
        z[:changed] = rng.normal(size=(changed, 8))       # those samples' outputs replaced
        return y, z

    y, z = pair(*few)
    scorer = scores.Scorer(goal, y, None)
    _, drop = scorer.score(z)
    bound = scorer.bound(z, drop)
    assert drop <= 0.1 < bound
    assert not scorer.meets(bound)
    y, z = pair(*many)
    scorer = scores.Scorer(goal, y, None)
    _, drop = scorer.score(z)
    bound = scorer.bound(z, drop)
    assert drop <= bound <= 0.1 and scorer.meets(bound)
    assert scorer.bound(y, 0.0) == 0.0          # identical outputs: nothing to bound


def test_a_smaller_candidate_the_bound_did_not_confirm_is_noted():
    def candidate(id_, size, drop, bound):
        c = engine.Candidate(id_, "f", f"c{id_}", 0, 0.0, drop, drop=drop, drop_bound=bound, verified=True,
                             meets=bound <= 0.01, bytes=size)
        return c

    chosen, unconfirmed, too_far = candidate(1, 1000, 0.002, 0.004), candidate(2, 600, 0.008, 0.013), \
        candidate(3, 400, 0.02, 0.03)
    note = engine._unconfirmed_note([chosen, unconfirmed, too_far], chosen, 0.01, lambda c: c.bytes)
    assert note is not None and note.startswith("1 smaller candidate(s)") and "#2" in note and "0.60x" in note
    assert engine._unconfirmed_note([chosen, too_far], chosen, 0.01, lambda c: c.bytes) is None


def _ctc_scores(texts: list[list[int]], steps: int = 8, classes: int = 5) -> np.ndarray:
    """One-hot [samples, steps, classes] scores whose greedy decoding is ``texts`` (blank 0)."""
    out = np.zeros((len(texts), steps, classes), np.float32)
    for i, text in enumerate(texts):
        path = list(text) + [0] * (steps - len(text))
        for t, c in enumerate(path):
            out[i, t, c] = 1.0
    return out


def test_ctc_agreement_scores_the_decoded_text():
    goal = parse_recipe({"goal": {"metric": "ctc_agreement"}}).goal
    y = _ctc_scores([[1, 2, 3], [4], []])
    assert scores.ctc_decode(y, 0) == [[1, 2, 3], [4], []]
    # a character stretched over one more step, where the original had blank: the same text, which
    # top1_agreement per position counts as a change
    stretched = y.copy()
    stretched[0, 3] = np.eye(5)[3]
    assert scores.ctc_decode(stretched, 0)[0] == [1, 2, 3]
    assert scores.value(goal, y, stretched) == 1.0
    top1 = parse_recipe({"goal": {"metric": "top1_agreement"}}).goal
    assert scores.value(top1, y, stretched) < 1.0
    # one character of the first text substituted, the empty third read as one character: edits
    # 1 + 1 over the longer lengths 3 + 1 + 1
    changed = _ctc_scores([[1, 4, 3], [4], [2]])
    assert scores.value(goal, y, changed) == pytest.approx(1 - 2 / 5)
    # repeats merge only when adjacent: 1 blank 1 reads two characters
    assert scores.ctc_decode(_ctc_scores([[1, 0, 1]]), 0) == [[1, 1]]
    # another blank index
    other = parse_recipe({"goal": {"metric": "ctc_agreement", "blank": 4}}).goal
    assert scores.ctc_decode(y, 4)[0] == [1, 2, 3, 0]
    assert scores.value(other, y, y) == 1.0
    # the bootstrap's per-sample parts are the metric over every sample once
    (o_num, o_den), (c_num, c_den) = scores._per_sample(goal, y, changed, None)
    every = np.arange(3)[None, :]
    assert scores._ratio(c_num, c_den, every)[0] == pytest.approx(1 - 2 / 5)
    assert scores._ratio(o_num, o_den, every)[0] == 1.0


@pytest.mark.parametrize(("goal", "shape", "loc"), [
    ({"metric": "ctc_agreement"}, [1, 10], ["goal", "metric"]),             # no time axis
    ({"metric": "ctc_agreement", "blank": 10}, [1, 25, 10], ["goal", "blank"]),   # not a class
    ({"metric": "ctc_agreement"}, [1, 25, 1], ["goal", "metric"]),          # nothing to argmax
])
def test_ctc_goal_that_does_not_fit_the_output_is_refused(goal, shape, loc):
    from core.errors import RecipeError
    from core.goal import check_goal

    spec = parse_recipe({"goal": goal}).goal
    outputs = [{"name": "probs", "shape": shape, "dtype": "float32"}]
    with pytest.raises(RecipeError) as caught:
        check_goal(spec, outputs, has_data=True, has_labels=False)
    assert caught.value.errors[0]["loc"] == loc
    check_goal(parse_recipe({"goal": {"metric": "ctc_agreement", "blank": 9}}).goal,
               [{"name": "probs", "shape": [1, 25, 10], "dtype": "float32"}], has_data=True, has_labels=False)


def test_ctc_agreement_trims_the_named_classes_at_the_ends_only():
    # class 4 as a line recognizer's space: " 1 2" and "1 2 " read as "1 2"; "1 4 2" keeps its space
    y = _ctc_scores([[1, 4, 2], [1, 2], [3]])
    z = _ctc_scores([[4, 1, 4, 2], [1, 2, 4], [3]])
    plain = parse_recipe({"goal": {"metric": "ctc_agreement"}}).goal
    trimmed = parse_recipe({"goal": {"metric": "ctc_agreement", "trim": [4]}}).goal
    assert scores.value(plain, y, z) == pytest.approx(1 - 2 / 8)
    assert scores.value(trimmed, y, z) == 1.0
    # a space lost between words still counts
    assert scores.value(trimmed, y, _ctc_scores([[1, 2], [1, 2], [3]])) == pytest.approx(1 - 1 / 6)
    assert scores._trimmed([[4, 4], [4, 1, 4]], [4]) == [[], [1]]


def test_trim_belongs_to_ctc_agreement_and_to_the_output_classes():
    from core.errors import RecipeError
    from core.goal import check_goal

    with pytest.raises(RecipeError) as caught:
        parse_recipe({"goal": {"metric": "top1_agreement", "trim": [3]}})
    assert caught.value.errors[0]["loc"][:2] == ["goal", "trim"]
    spec = parse_recipe({"goal": {"metric": "ctc_agreement", "trim": [3, 10]}}).goal
    with pytest.raises(RecipeError) as caught:
        check_goal(spec, [{"name": "probs", "shape": [1, 25, 10], "dtype": "float32"}], has_data=True,
                   has_labels=False)
    assert caught.value.errors[0]["loc"] == ["goal", "trim"]
    assert "[10]" in caught.value.errors[0]["msg"]


def test_blank_belongs_to_ctc_agreement_only():
    from core.errors import RecipeError

    assert parse_recipe({"goal": {"metric": "ctc_agreement"}}).goal.blank == 0
    with pytest.raises(RecipeError):
        parse_recipe({"goal": {"metric": "top1_agreement", "blank": 0}})


def test_saved_candidates_are_the_safer_ones_then_the_near_misses():
    def candidate(id_, size, drop, meets, chosen=False):
        return engine.Candidate(id_, "f", f"#{id_}", 0, 0.0, drop, value=1 - drop, drop=drop, verified=True,
                                meets=meets, bytes=size, pareto=True, chosen=chosen)

    frontier = [candidate(0, 1000, 0.0, True), candidate(1, 500, 0.004, True, chosen=True),
                candidate(2, 700, 0.001, True), candidate(3, 100, 1.0, False), candidate(4, 450, 0.02, False),
                candidate(5, 300, 0.3, False)]
    saved = engine._worth_saving(frontier, lambda c: c.bytes)
    # the original (#0) and the chosen one are not saved again; the collapsed smallest (#3) comes last
    assert [c.id for c in saved] == [2, 4, 5]
