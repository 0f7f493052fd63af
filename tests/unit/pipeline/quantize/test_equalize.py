"""quantize.equalize: cross-layer equalization leaves float outputs equal (1e-5 relative), evens out
the per-channel weight ranges of a Conv -> ReLU -> depthwise Conv -> Conv chain, and leaves a
bounded activation (Clip) alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from worker.pipeline import graph
from worker.pipeline.quantize import equalize

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
