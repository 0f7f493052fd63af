"""quantize.equalize: cross-layer equalization leaves float outputs equal (1e-5 relative), evens out
the per-channel weight ranges of a Conv -> ReLU -> depthwise Conv -> Conv chain, leaves a bounded
activation (Clip) alone without calibration ranges and passes it only where exact on them; high-bias
absorption leaves outputs equal on the calibration data and moves each channel's floor out of the
activation between the convs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from worker.pipeline import graph
from core.recipe import QuantizeStep
from worker.pipeline.data import bind
from worker.pipeline.quantize import equalize
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext

C = 16


def _chain(middle: str = "Relu") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, 3, 3, 3)).astype(np.float32)
    w1 *= np.logspace(-2, 1, C, dtype=np.float32).reshape(-1, 1, 1, 1)      # ranges over 3 decades
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.standard_normal((C, 1, 3, 3)).astype(np.float32), "Wd"),
             numpy_helper.from_array(rng.standard_normal((8, C, 1, 1)).astype(np.float32), "W3")]
    act = [helper.make_node("Relu", ["c1"], ["a1"], name="act")] if middle == "Relu" else \
        [helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act")]
    if middle != "Relu":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), *act,
             helper.make_node("Conv", ["a1", "Wd"], ["d"], group=C, pads=[1, 1, 1, 1], name="depthwise"),
             helper.make_node("Conv", ["d", "W3"], ["y"], name="pointwise")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, 8])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _spread(model, name):
    w = graph.get_array(model, name)
    ranges = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return ranges.max() / ranges.min()


def test_equalization_is_exact_and_evens_the_ranges():
    model = _chain()
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    assert equalize.equalize(equalized) == ["conv1", "depthwise"]
    onnx.checker.check_model(equalized, full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    before, after = builders.run_ort(model, feeds)[0], builders.run_ort(equalized, feeds)[0]
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5
    assert _spread(equalized, "W1") < 0.1 * _spread(model, "W1")


def test_a_bounded_activation_is_not_equalized_through():
    model = _chain("Clip")
    assert equalize.equalize(model) == ["depthwise"]


def _feeds(count=32, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_clip_is_equalized_through_only_where_exact_on_the_calibration_data():
    model = _chain("Clip")
    feeds = _feeds()
    ranges = equalize.channel_ranges(model, bind(model, feeds))
    seen = ranges["c1"]
    clipped = seen.hi > 6.0                              # channels the Clip cuts on this data
    assert clipped.any() and (~clipped).any()
    before_w1 = graph.get_array(model, "W1").copy()
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    assert equalize.equalize(equalized, ranges) == ["conv1", "depthwise"]
    after_w1 = graph.get_array(equalized, "W1")
    np.testing.assert_array_equal(after_w1[clipped], before_w1[clipped])     # scaling would move the clip
    assert not np.allclose(after_w1[~clipped], before_w1[~clipped])
    assert _rel(builders.run_ort(equalized, feeds)[0], builders.run_ort(model, feeds)[0]) < 1e-5


def _biased_chain(pad2: int = 0) -> onnx.ModelProto:
    """x -> Conv 3x3 (C) + large positive biases -> Relu -> Conv (8, 1x1 or 3x3 padded) + b -> y."""
    rng = np.random.default_rng(3)
    k2 = 3 if pad2 else 1
    bias = np.linspace(-1.0, 12.0, C).astype(np.float32)          # half the channels never reach 0
    inits = [numpy_helper.from_array((rng.standard_normal((C, 3, 3, 3)) * 0.2).astype(np.float32), "W1"),
             numpy_helper.from_array(bias, "B1"),
             numpy_helper.from_array(rng.standard_normal((8, C, k2, k2)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B2")]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["a1"], name="act"),
             helper.make_node("Conv", ["a1", "W2", "B2"], ["y"], pads=[pad2] * 4, name="conv2")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, 8])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_high_bias_absorption_is_exact_on_the_data_and_lowers_the_activation_range():
    model = _biased_chain()
    feeds = _feeds()
    ranges = equalize.channel_ranges(model, bind(model, feeds))
    floor = ranges["c1"].lo.copy()
    assert (floor > 0).sum() >= C // 4
    absorbed = onnx.ModelProto()
    absorbed.CopyFrom(model)
    assert equalize.absorb_high_bias(absorbed, ranges) == ["conv1"]
    onnx.checker.check_model(absorbed, full_check=True)
    assert _rel(builders.run_ort(absorbed, feeds)[0], builders.run_ort(model, feeds)[0]) < 1e-5
    np.testing.assert_allclose(graph.get_array(absorbed, "B1"),
                               graph.get_array(model, "B1") - np.maximum(floor, 0), rtol=1e-6, atol=1e-6)
    # the activation between the convs: each absorbed channel now starts at 0
    inner = onnx.ModelProto()
    inner.CopyFrom(absorbed)
    inner.graph.output.extend([helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)])
    c1 = builders.run_ort(inner, feeds)[1]
    np.testing.assert_allclose(c1.min(axis=(0, 2, 3))[floor > 0], 0.0, atol=1e-4)
    # the range one per-tensor grid must span after the ReLU shrinks
    original_top = np.maximum(ranges["c1"].hi + np.maximum(floor, 0), 0).max()
    assert np.maximum(c1, 0).max() < 0.9 * original_top, (np.maximum(c1, 0).max(), original_top)


def test_high_bias_absorption_skips_a_padded_second_conv():
    model = _biased_chain(pad2=1)
    ranges = equalize.channel_ranges(model, bind(model, _feeds()))
    assert equalize.absorb_high_bias(model, ranges) == []


def test_static_int8_with_absorption_reports_it():
    model = _biased_chain()
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=0,
                          min_products=0, equalize=True, high_bias_absorption=True)
    feeds = _feeds()
    result = quantize_static(model, params, StepContext(original=model, calibration=feeds))
    assert result.metrics["bias_absorbed_layers"] == 1
    assert _rel(builders.run_ort(result.model, feeds)[0], builders.run_ort(model, feeds)[0]) < 0.05


def test_conv_biases_in_constant_nodes_are_lifted_so_the_chain_is_found():
    """paddle2onnx writes Conv biases as Constant nodes: static int8 lifts them first, else no pair."""
    model = _biased_chain()
    bias = graph.get_array(model, "B1")
    graph.remove_initializers(model, ["B1"])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["B1"], value=numpy_helper.from_array(bias, "B1"),
                                                name="bias_constant"))
    assert equalize.pairs(model) == []
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=0,
                          min_products=0, equalize=True, high_bias_absorption=True)
    feeds = _feeds()
    result = quantize_static(model, params, StepContext(original=model, calibration=feeds))
    assert result.metrics["equalized_layers"] == 1 and result.metrics["bias_absorbed_layers"] == 1
    assert _rel(builders.run_ort(result.model, feeds)[0], builders.run_ort(model, feeds)[0]) < 0.05
