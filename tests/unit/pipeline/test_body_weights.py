"""Weights inside nested If bodies held in Constant nodes, or computed from constants by layout ops
(silero-vad's shapes): lifted exactly, then static int8 stores them int8 instead of refusing the
model or leaving them float."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline import body_weights
from worker.pipeline.quantize import lift_constants
from worker.pipeline.quantize.static import check, quantize_static
from worker.pipeline.step import StepContext

D, H, SEQ = 32, 16, 5


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name))


def _gates(source: str, prefix: str) -> list[onnx.NodeProto]:
    """PyTorch's LSTM export: rows of ``source`` ([4H, K], gates i f g o) re-ordered to ONNX's
    i o f c by three Slices (bounds in Constant nodes), a Concat, and an Unsqueeze to [1, 4H, K]."""
    nodes, parts = [], []
    for index, (start, end) in enumerate(((0, H), (3 * H, 4 * H), (H, 3 * H))):
        bounds = [f"{prefix}_start{index}", f"{prefix}_end{index}", f"{prefix}_axis{index}"]
        nodes += [_const(bounds[0], np.array([start], np.int64)), _const(bounds[1], np.array([end], np.int64)),
                  _const(bounds[2], np.array([0], np.int64))]
        nodes.append(helper.make_node("Slice", [source, *bounds], [f"{prefix}_part{index}"], name=f"{prefix}_slice{index}"))
        parts.append(f"{prefix}_part{index}")
    nodes += [helper.make_node("Concat", parts, [f"{prefix}_gates"], axis=0, name=f"{prefix}_concat"),
              _const(f"{prefix}_axes", np.array([0], np.int64)),
              helper.make_node("Unsqueeze", [f"{prefix}_gates", f"{prefix}_axes"], [f"{prefix}_onnx"],
                               name=f"{prefix}_unsqueeze")]
    return nodes


def _lstm_branch(tag: str, with_state: bool) -> onnx.GraphProto:
    """An If branch running the LSTM over ``h`` (the enclosing body's), W and R built from the
    main graph's ``weight_ih`` / ``weight_hh`` by ``_gates``; with or without the initial state."""
    nodes = _gates("weight_ih", f"{tag}_W") + _gates("weight_hh", f"{tag}_R")
    inputs = ["h", f"{tag}_W_onnx", f"{tag}_R_onnx"] + (["", "", "h0", "c0"] if with_state else [])
    nodes += [helper.make_node("LSTM", inputs, ["", f"{tag}_y"], hidden_size=H, name=f"{tag}_lstm"),
              _const(f"{tag}_drop", np.array([0], np.int64)),
              helper.make_node("Squeeze", [f"{tag}_y", f"{tag}_drop"], [f"{tag}_out"], name=f"{tag}_squeeze")]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [1, H])])


def nested_vad(seed: int = 0) -> onnx.ModelProto:
    """silero-vad's structure in small: main: If(use_net) whose then-branch projects x with a weight
    held in a Constant node (``proj``) and holds a nested If(has_state) whose two branches run the
    same LSTM, each re-ordering the main graph's gate weights itself; else-branch: zeros. No main-graph
    layer at all."""
    rng = np.random.default_rng(seed)
    proj = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    inner = helper.make_node("If", ["has_state"], ["lstm_out"], name="state_if",
                             then_branch=_lstm_branch("stateful", True), else_branch=_lstm_branch("fresh", False))
    net = helper.make_graph([_const("proj", proj), helper.make_node("MatMul", ["x", "proj"], ["h"], name="project"),
                             inner], "net", [], [helper.make_tensor_value_info("lstm_out", TensorProto.FLOAT, [1, H])])
    zeros = helper.make_graph([_const("zeros", np.zeros((1, H), np.float32))], "off", [],
                              [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, [1, H])])
    main = helper.make_graph(
        [helper.make_node("If", ["use_net"], ["y"], name="net_if", then_branch=net, else_branch=zeros)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, 1, D]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, H]),
         helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, H]),
         helper.make_tensor_value_info("use_net", TensorProto.BOOL, []),
         helper.make_tensor_value_info("has_state", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, H])],
        [numpy_helper.from_array((rng.standard_normal((4 * H, D)) / 4).astype(np.float32), "weight_ih"),
         numpy_helper.from_array((rng.standard_normal((4 * H, H)) / 4).astype(np.float32), "weight_hh")])
    model = helper.make_model(main, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(count: int, has_state: bool, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((SEQ, 1, D)).astype(np.float32),
             "h0": rng.standard_normal((1, 1, H)).astype(np.float32) * 0.5,
             "c0": rng.standard_normal((1, 1, H)).astype(np.float32) * 0.5,
             "use_net": np.array(True), "has_state": np.array(has_state)} for _ in range(count)]


def _params(**overrides) -> QuantizeStep:
    return QuantizeStep(**{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"},
                           **overrides})


def _calibration() -> dict[str, np.ndarray]:
    """The stacked layout (one whole sample per feed): scalars use_net / has_state as [N]."""
    feeds = _feeds(4, True) + _feeds(4, False, seed=2)
    return {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]}


def _assert_no_float_weight_and_close(model: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Nothing as large as a weight left float, and both branches of the inner If close to float."""
    floats = [t.name for t in quantized.graph.initializer
              if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 1024]
    assert floats == []
    for has_state in (True, False):
        for feed in _feeds(4, has_state, seed=7):
            assert builders.rel_l2(builders.run_ort(model, feed), builders.run_ort(quantized, feed)) < 0.03


def test_lifting_is_exact_shares_the_lstm_weights_of_both_branches_and_drops_the_chains():
    model = nested_vad()
    lifted = onnx.ModelProto()
    lifted.CopyFrom(model)
    names = lift_constants.lift_constant_weights(lifted)
    onnx.checker.check_model(lifted, full_check=True)
    inits = {t.name: t for t in lifted.graph.initializer}
    # proj keeps its Constant's name; each gate weight is computed once for both LSTMs
    assert sorted(names) == ["proj", "weight_hh_LSTM_R", "weight_ih_LSTM_W"]
    assert list(inits["weight_ih_LSTM_W"].dims) == [1, 4 * H, D] and "weight_ih" not in inits
    lstms = [n for g in body_weights.subgraphs.all_bodies(lifted) for n in g.node if n.op_type == "LSTM"]
    assert [n.input[1:3] for n in lstms] == [["weight_ih_LSTM_W", "weight_hh_LSTM_R"]] * 2
    # the Slice / Concat / Unsqueeze chains and the Constant are gone from every body
    left = {n.op_type for g in body_weights.subgraphs.all_bodies(lifted) for n in g.node}
    assert not left & {"Slice", "Concat", "Unsqueeze"}
    # the folded values are the re-ordered rows exactly
    source = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "weight_ih"))
    expected = np.concatenate([source[:H], source[3 * H:], source[H:3 * H]])[None]
    np.testing.assert_array_equal(numpy_helper.to_array(inits["weight_ih_LSTM_W"]), expected)
    for has_state in (True, False):     # (ONNX Runtime may pick another MatMul kernel: rounding only)
        for feed in _feeds(3, has_state):
            np.testing.assert_allclose(builders.run_ort(model, feed)[0], builders.run_ort(lifted, feed)[0],
                                       rtol=1e-5, atol=1e-6)


def test_a_source_another_reader_keeps_is_not_folded_twice():
    model = nested_vad()
    # the main graph also reads weight_ih: folding would store it twice (float + the folded copy)
    model.graph.node.append(helper.make_node("ReduceSum", ["weight_ih"], ["total"], name="reads_source"))
    model.graph.output.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, None))
    names = lift_constants.lift_constant_weights(model)
    assert "weight_ih_LSTM_W" not in names and "weight_hh_LSTM_R" in names
    assert "weight_ih" in {t.name for t in model.graph.initializer}


def test_static_int8_accepts_constant_weights_in_nested_ifs_and_stores_the_lstm_int8():
    model = nested_vad()
    calibration = _calibration()
    ctx = StepContext(original=model, calibration=calibration)
    check(model, _params(), ctx)          # refused before: "no Conv / MatMul / Gemm weight has 1024 ..."
    result = quantize_static(model, _params(), ctx)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.metrics["quantized_body_weights"] == 3
    for name, rows in (("weight_ih_LSTM_W", 4 * H), ("weight_hh_LSTM_R", 4 * H)):
        dq = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
        q = next(t for t in result.model.graph.initializer if t.name == dq.input[0])
        scale = next(t for t in result.model.graph.initializer if t.name == dq.input[1])
        assert q.data_type == TensorProto.INT8 and list(scale.dims) == [rows]       # one scale per gate row
    _assert_no_float_weight_and_close(model, result.model)


def test_weights_left_for_the_runtime_still_refuse_when_too_small():
    model = nested_vad()
    with pytest.raises(RecipeError):
        check(model, _params(min_params=1 << 20), StepContext(original=model, calibration=_calibration()))


def test_dynamic_int8_stores_the_nested_weights_int8_instead_of_refusing():
    from worker.pipeline.quantize.dynamic import check as check_dynamic, quantize_dynamic

    model = nested_vad()
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "dynamic"})
    ctx = StepContext(original=model, calibration=None)
    check_dynamic(model, params, ctx)     # refused before: "no 2-D MatMul / Gemm weight has 1024 or more elements"
    result = quantize_dynamic(model, params, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.metrics["recurrent_and_body_weights_int8"] == 3
    assert {"proj", "weight_ih_LSTM_W", "weight_hh_LSTM_R"} <= set(ctx.layers)
    _assert_no_float_weight_and_close(model, result.model)


def test_the_upload_counts_the_weights_held_in_body_constants(tmp_path):
    from core.onnx_guard import validate
    from core.settings import Settings

    model = nested_vad()
    path = tmp_path / "vad.onnx"
    path.write_bytes(model.SerializeToString())
    info = validate(path, Settings(home=tmp_path / "home"))
    # weight_ih, weight_hh (initializers) and proj (a Constant inside the If: was not counted)
    assert info.params == 4 * H * D + 4 * H * H + D * D
