"""Sequential propagation (worker.pipeline.sequential): the values it carries equal a whole-model
run's, whatever the batch, the budget (spilled to disk) or the order tensors are asked for; the
statistics the layer-wise methods take from it equal the old whole-model captures'."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline.builders import _model, attention, mlp, run_ort
from worker.pipeline import activations, sessions
from worker.pipeline.data import bind
from worker.pipeline.sequential import Propagation, SequenceError, lockstep
from worker.pipeline.hessians import accumulate_drift, accumulate_hessians, capture_drift, capture_hessians


def _residual_mlp(width: int = 16, depth: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x -> (MatMul, Relu, + x) repeated: every cut has the residual stream and the input alive."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 4).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [f"r{i}", "x"], [f"h{i}"], name=f"res{i}")]
        current = f"h{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                  [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", width])], inits)


def _whole(model, feeds, names):
    return dict(zip(names, sessions.session(model, outputs=names).run(list(names), feeds)))


@pytest.mark.parametrize("budget", [1 << 30, 1])
def test_values_equal_a_whole_model_run(budget):
    model = _residual_mlp()
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    expected = _whole(model, {"x": x}, ["m0", "m1", "h1", "m2", "h2"])
    with Propagation(model, bind(model, {"x": x}), batch_size=16, budget_bytes=budget) as flow:
        for names in (["m0"], ["m1", "h1"], ["m2"], ["h2"]):
            got = list(flow.stream(names))
            assert len(got) == 3          # 16 + 16 + 8 samples
            for name in names:
                np.testing.assert_allclose(np.concatenate([b[name] for b in got]), expected[name], rtol=1e-6)
        assert flow.stats.segments == 4
        assert (flow.stats.spilled > 0) == (budget == 1)


def test_segment_takes_weights_changed_before_it_is_reached():
    model = _residual_mlp()
    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    with Propagation(model, bind(model, {"x": x}), batch_size=8) as flow:
        list(flow.stream(["m0"]))
        w1 = numpy_helper.to_array(model.graph.initializer[1])
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w1 * 0, "W1"))
        (got,) = list(flow.stream(["m1"]))
    np.testing.assert_array_equal(got["m1"], 0.0)


def test_asking_for_a_dead_tensor_starts_over():
    model = _residual_mlp()
    x = np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)
    expected = _whole(model, {"x": x}, ["m0"])
    with Propagation(model, bind(model, {"x": x}), batch_size=8) as flow:
        list(flow.stream(["h2"]))
        (again,) = list(flow.stream(["m0"]))
        assert flow.stats.restarts == 1
    np.testing.assert_allclose(again["m0"], expected["m0"], rtol=1e-6)


def test_abandoned_stream_is_refused():
    model = _residual_mlp()
    x = np.random.default_rng(4).standard_normal((32, 16)).astype(np.float32)
    with Propagation(model, bind(model, {"x": x}), batch_size=8) as flow:
        next(iter(flow.stream(["m1"])))
        with pytest.raises(SequenceError):
            list(flow.stream(["m2"]))


def test_if_body_reading_outer_tensors():
    """A segment holding an If whose branches read a tensor of the main graph (implicit input)."""
    width = 4
    w = np.eye(width, dtype=np.float32) * 2
    then = helper.make_graph([helper.make_node("Mul", ["a", "two"], ["t_out"], name="t_mul")], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"], name="e_neg")], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="fc"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.float32(2), "two"),
             numpy_helper.from_array(np.float32(0), "zero")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    x = np.random.default_rng(5).standard_normal((6, 1, width)).astype(np.float32)   # stacked: one at a time
    with Propagation(model, bind(model, {"x": x}), batch_size=4) as flow:
        list(flow.stream(["a"]))
        got = np.stack([b["y"] for b in flow.stream(["y"])])
    want = np.stack([run_ort(model, {"x": sample})[0] for sample in x])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sequential_hessians_equal_the_whole_model_captures():
    """The statistics SparseGPT takes: H of each layer input, and (H~, C) against the original."""
    model = attention(d=32, seq=8)
    data = {name: value for name, value in _attention_inputs(model).items()}
    dataset = bind(model, data)
    sources = sorted({node.input[0] for node in model.graph.node if node.op_type == "MatMul"
                      and node.input[1] in {t.name for t in model.graph.initializer}})
    plans = {source: [(source, 32, None)] for source in sources}
    old = capture_hessians(model, dataset, plans)
    with Propagation(model, dataset, batch_size=5) as flow:
        made = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
        new = {}
        for source in sorted(sources, key=lambda s: made.get(s, -1)):
            new.update(accumulate_hessians(flow.stream([source]), {source: plans[source]}))
    for key in old:
        np.testing.assert_allclose(new[key], old[key], rtol=1e-4, atol=1e-6 * np.abs(old[key]).max())

    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    first = next(t for t in changed.graph.initializer if t.name == "q.W")
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 0.5, first.name))
    last = "ctx"                       # downstream of q.W: its input drifts
    old_drift = capture_drift(model, changed, dataset, {last: plans[last]})
    with Propagation(model, dataset, batch_size=7) as reference, Propagation(changed, dataset, batch_size=7) as current:
        new_drift = accumulate_drift(reference.stream([last]), current.stream([last]), {last: plans[last]})
    for (h_old, c_old), (h_new, c_new) in zip(old_drift.values(), new_drift.values()):
        assert not np.allclose(h_old, c_old)
        np.testing.assert_allclose(h_new, h_old, rtol=1e-4, atol=1e-6 * np.abs(h_old).max())
        np.testing.assert_allclose(c_new, c_old, rtol=1e-4, atol=1e-6 * np.abs(c_old).max())


def test_lockstep_runs_every_stream_to_its_end():
    model = mlp(inputs=8, hidden=8, classes=4)
    x = np.random.default_rng(6).standard_normal((12, 8)).astype(np.float32)
    dataset = bind(model, {"x": x})
    with Propagation(model, dataset, batch_size=4) as a, Propagation(model, dataset, batch_size=4) as b:
        pairs = list(lockstep(a.stream(["h2"]), b.stream(["h2"])))
        assert len(pairs) == 3
        list(a.stream(["logits"]))       # neither was left half way
        list(b.stream(["logits"]))


def _attention_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for value in model.graph.input:
        dims = [d.dim_value or 13 for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def test_drift_from_outputs_equals_drift_from_the_cross_gram():
    """accumulate_drift with weights: P = M C whether summed from the outputs (narrow layer) or
    from the shared cross Gram (wide layers), and the refit equals drift_corrected's."""
    from worker.pipeline.hessians import accumulate_drift, drift_corrected, drift_refit

    rng = np.random.default_rng(5)
    before = [{"x": rng.normal(size=(4, 7, 12)).astype(np.float32)} for _ in range(3)]
    after = [{"x": b["x"] + 0.1 * rng.normal(size=b["x"].shape).astype(np.float32)} for b in before]
    weights = {"narrow": rng.normal(size=(3, 12)), "wide_a": rng.normal(size=(12, 12)), "wide_b": rng.normal(size=(12, 12))}
    plans = {"x": [("narrow", 12, None)]}
    plans_wide = {"x": [("wide_a", 12, None), ("wide_b", 12, None)]}
    narrow = accumulate_drift(iter(before), iter(after), plans, weights={"narrow": weights["narrow"]})
    wide = accumulate_drift(iter(before), iter(after), plans_wide,
                            weights={k: weights[k] for k in ("wide_a", "wide_b")})
    plain = accumulate_drift(iter(before), iter(after), {"x": plans["x"] + plans_wide["x"]})
    assert wide["wide_a"][0] is wide["wide_b"][0]          # one Hessian for layers reading one input
    for key, found in {**narrow, **wide}.items():
        h, c = plain[key]
        np.testing.assert_allclose(found[0], h, rtol=1e-6)
        np.testing.assert_allclose(found[1], weights[key] @ c, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(drift_refit(weights[key], *found), drift_corrected(weights[key], h, c),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("geometry", [
    {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)},
    {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 0, 1, 0), "dilations": (1, 1)},
    {"kernel": (1, 1), "strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1)},
    {"kernel": (3, 3), "strides": (1, 2), "pads": (2, 2, 2, 2), "dilations": (2, 2)}])
def test_unfold_every_is_the_strided_full_unfold(geometry):
    from worker.pipeline.unfold import unfold2d, unfold2d_every

    x = np.random.default_rng(2).normal(size=(3, 5, 17, 13)).astype(np.float32)
    for every in (1, 3, 7, 1000):
        np.testing.assert_array_equal(unfold2d_every(x, geometry, every), unfold2d(x, geometry)[::every])
