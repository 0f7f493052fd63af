"""``goal.carry`` on a recurrent model built here (h = x W + state R, output = h V, stateN = h): the
search scores the samples as one stream, each step fed the state the same model produced the step
before, so the budget holds where the model is used that way; a carry that names no output /
input of the model is refused with the field's path."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.data import bind
from worker.pipeline.runner import run
from worker.pipeline.search import engine, scores, space
from worker.pipeline.step import StepContext
from tests.unit.pipeline.builders import run_ort

WIDTH = 64
OPTIONS = {"latency_runs": 2, "layer_errors": False}
GOAL = {"metric": "cosine", "max_drop": 0.002, "time_budget_s": 120, "carry": {"stateN": "state"}}


def recurrent(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    # a slowly forgetting state (spectral radius 0.9): a step's error lives on for many steps
    q, _ = np.linalg.qr(rng.standard_normal((WIDTH, WIDTH)))
    r = (0.9 * q).astype(np.float32)
    v = (rng.standard_normal((WIDTH, 8)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="input_proj"),
             helper.make_node("MatMul", ["state", "R"], ["sr"], name="recur"),
             helper.make_node("Add", ["xw", "sr"], ["stateN"], name="add"),
             helper.make_node("MatMul", ["stateN", "V"], ["output"], name="head")]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", WIDTH]),
                                         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["b", WIDTH])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 8]),
                           helper.make_tensor_value_info("stateN", TensorProto.FLOAT, ["b", WIDTH])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"),
                           numpy_helper.from_array(v, "V")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def stream(steps: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((steps, WIDTH)).astype(np.float32),
            "state": np.zeros((steps, WIDTH), np.float32)}


def streamed(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    """The model run step by step, its state carried: written here apart from the search."""
    state, found = data["state"][:1], []
    for t in range(len(data["x"])):
        output, state = run_ort(model, {"x": data["x"][t:t + 1], "state": state})
        found.append(output)
    return np.concatenate(found)


def test_search_scores_the_stream_and_the_budget_holds_there(tmp_path):
    model = recurrent()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    evaluation = stream(40, seed=7)
    goal = parse_recipe({"goal": GOAL}).goal
    ctx = StepContext(original=model, calibration=stream(32, seed=1))
    search = engine.Search(model, model, goal, space.default_families(True), ctx, bind(model, evaluation),
                           tmp_path / "s")
    reference = streamed(model, evaluation)
    assert np.allclose(search.full.reference, reference, atol=1e-5)
    # not what one batch with the recorded (zero) states gives: the carried state is in the score
    assert not np.allclose(reference, run_ort(model, evaluation)[0], atol=1e-2)
    result = run(path, parse_recipe({"goal": GOAL}), calibration=stream(32, seed=1), evaluation=evaluation,
                 workdir=tmp_path / "out", options=OPTIONS)
    assert result.report["goal"]["met"] and result.report["goal"]["carry"] == {"stateN": "state"}
    chosen = onnx.load(result.model_path)
    assert scores.value(goal, reference, streamed(chosen, evaluation)) >= 1 - GOAL["max_drop"]
    assert result.report["size_ratio"] > 1.5


@pytest.mark.parametrize("carry, why", [({"hidden": "state"}, "no output 'hidden'"),
                                        ({"stateN": "memory"}, "no input 'memory'"),
                                        # [b, 8] into [b, WIDTH]: ONNX Runtime refused it at the first
                                        # stream step, exit 1 with its traceback
                                        ({"output": "state"}, "output 'output' has shape [None, 8]")])
def test_carry_that_does_not_fit_the_model_is_refused(carry, why):
    model = recurrent()
    goal = parse_recipe({"goal": {**GOAL, "carry": carry}}).goal
    with pytest.raises(RecipeError) as caught:
        engine.check_and_split(model, goal, None, bind(model, stream(8, seed=2)))
    assert caught.value.errors[0]["loc"] == ["goal", "carry"] and why in caught.value.errors[0]["msg"]


def test_one_input_fed_from_two_outputs_is_refused_by_the_recipe():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"goal": {**GOAL, "carry": {"stateN": "state", "output": "state"}}})
    assert "goal" in str(caught.value) and "carry" in str(caught.value)
