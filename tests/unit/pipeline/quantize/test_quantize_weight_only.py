"""Weight-only quantization (quantize step, no activations): stored values bit-exact to
docs/recipes.md's formula computed here in numpy, outputs in ONNX Runtime close to the original's,
inputs and outputs unchanged.

Bounds: ONNX Runtime (>= 1.2x) fuses DequantizeLinear + MatMul into MatMulNBits with int8
activation compute, which itself adds about 1% output error, so int8 bounds are a few percent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import runner
from worker.pipeline.runner import io_signature
from worker.pipeline.step import StepContext
from worker.pipeline.steps import quantize as quantize_step

FAST = {"latency_runs": 5, "latency_budget_s": 1.0}


def step(spec: dict):
    return parse_recipe({"steps": [{"op": "quantize", **spec}]}).steps[0]


def apply(model: onnx.ModelProto, spec: dict, **ctx_kwargs):
    """Run the quantize step directly. Tests look at the DequantizeLinear form unless they name a
    format (the recipe's default, auto, may pick MatMulNBits by timing)."""
    spec = {"format": "qdq", **spec}
    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = StepContext(original=original, **ctx_kwargs)
    params = step(spec)
    quantize_step.check(model, params, ctx)
    result = quantize_step.run(model, params, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    assert io_signature(result.model) == io_signature(original)
    return result, ctx


def dq_of(model: onnx.ModelProto, weight: str) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """The DequantizeLinear producing ``weight`` and its stored inputs (q unpacked)."""
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == weight)
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {}
    for role, name in zip(("q", "scale", "zero_point"), node.input):
        array = numpy_helper.to_array(inits[name])
        arrays[role] = array.astype(np.int32) if array.dtype.kind not in "f" else array
    return node, arrays


def symmetric_reference(w: np.ndarray, bits: int, reduce_axes, keepdims=True):
    """docs/recipes.md symmetric: s = absmax / qmax (float32), q = clamp(rint(w / s), qmin, qmax)."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.max(np.abs(w), axis=reduce_axes, keepdims=keepdims).astype(np.float32)
    s = (absmax / np.float32(qmax)).astype(np.float32)
    s = np.where(s == 0, np.float32(1.0), s)
    q = np.clip(np.rint(w / s), -qmax - 1, qmax).astype(np.int32)
    return q, s


def test_mlp_int8_per_channel_bit_exact_and_close(tmp_path: Path):
    model = builders.mlp()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    feeds = builders.random_inputs(model, count=32)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}})
    out = result.model
    for name in ("W1", "W2"):
        node, stored = dq_of(out, name)
        assert onnx.helper.get_attribute_value(node.attribute[0]) == 1     # axis = MatMul's output axis
        assert out.graph.initializer[[t.name for t in out.graph.initializer].index(node.input[0])].data_type == onnx.TensorProto.INT8
        q, s = symmetric_reference(weights[name], 8, 0)
        np.testing.assert_array_equal(stored["q"], q)
        np.testing.assert_array_equal(stored["scale"], s.ravel())
        assert len(node.input) == 2          # symmetric: no zero point stored
        assert ctx.layers[name].bits == 8 and ctx.layers[name].extra["sqnr_db"] > 35
    # biases (256 + 16 elements, under min_params) stay float
    assert {"b1", "b2"} <= {t.name for t in out.graph.initializer}
    got = builders.run_ort(out, feeds)
    assert builders.rel_l2(expected, got) < 0.03
    # the dynamic batch axis still works
    for batch in (1, 7):
        assert builders.run_ort(out, {"x": feeds["x"][:batch]})[0].shape == (batch, 16)


def test_mlp_int8_end_to_end_size_ratio(tmp_path: Path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(), str(path))
    report = runner.run(path, parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}}]}),
                        workdir=tmp_path / "w", options=FAST).report
    assert report["size_ratio"] >= 3.5
    assert report["fidelity"]["rel_l2"] < 0.03


def test_per_tensor_and_asymmetric_int8():
    model = builders.mlp()
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W1"))
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, _ = apply(model, {"weights": {"bits": 8, "granularity": "tensor"}})
    node, stored = dq_of(result.model, "W1")
    q, s = symmetric_reference(w1, 8, None, keepdims=False)
    np.testing.assert_array_equal(stored["q"], q)
    assert stored["scale"].shape == () and stored["scale"] == s
    assert not node.attribute
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.05

    model = builders.mlp()
    result, _ = apply(model, {"weights": {"bits": 8, "symmetric": False}})
    node, stored = dq_of(result.model, "W1")
    lo = np.minimum(w1.min(axis=0), 0).astype(np.float32)
    hi = np.maximum(w1.max(axis=0), 0).astype(np.float32)
    s = ((hi - lo) / np.float32(255)).astype(np.float32)
    z = np.clip(np.rint(0 - lo / s), 0, 255).astype(np.int32)
    np.testing.assert_array_equal(stored["scale"], s)
    np.testing.assert_array_equal(stored["zero_point"], z)
    np.testing.assert_array_equal(stored["q"], np.clip(np.rint(w1 / s) + z, 0, 255))
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.03


def test_cnn_with_batchnorm_conv_per_output_channel():
    model = builders.cnn_bn()
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv2.W"))
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}, "min_params": 512})
    assert set(ctx.layers) == {"conv2.W"}        # conv1 (72) and fc (320) are under min_params
    node, stored = dq_of(result.model, "conv2.W")
    assert onnx.helper.get_attribute_value(node.attribute[0]) == 0
    q, s = symmetric_reference(w2, 8, (1, 2, 3))
    np.testing.assert_array_equal(stored["q"], q)
    np.testing.assert_array_equal(stored["scale"], s.ravel())
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.03


def test_shared_weight_quantized_once_for_both_readers():
    model = builders.shared_weight()
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}})
    dqs = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 1 and dqs[0].output[0] == "W" and list(ctx.layers) == ["W"]
    readers = [n for n in result.model.graph.node if "W" in n.input]
    assert [n.name for n in readers] == ["first", "second"]
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.03


def test_weights_in_constant_nodes_are_lifted_and_quantized():
    model = builders.mlp(constants=True)
    feeds = builders.random_inputs(model)
    expected = builders.run_ort(model, feeds)
    result, ctx = apply(model, {"weights": {"bits": 8}})
    assert set(ctx.layers) == {"W1", "W2"}
    assert set(result.metrics["lifted_constants"]) == {"W1", "W2"}
    assert not any(n.op_type == "Constant" and n.output[0] in ("W1", "W2") for n in result.model.graph.node)
    assert builders.rel_l2(expected, builders.run_ort(result.model, feeds)) < 0.03


def test_old_opset_is_raised_for_per_channel():
    model = builders.mlp(opset=11)
    result, _ = apply(model, {"weights": {"bits": 8}})
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")][0] >= 13


def test_float16_weights_get_float16_scales_at_an_opset_that_takes_them():
    # DequantizeLinear takes a float16 scale from opset 19: at 17 ONNX Runtime refused the model
    model = builders.float16_mlp()
    feeds = {"x": np.random.default_rng(5).standard_normal((8, 128)).astype(np.float16)}
    expected = builders.run_ort(model, feeds)
    result, _ = apply(model, {"weights": {"bits": 8}})
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")][0] >= 19
    _, arrays = dq_of(result.model, "W1")
    assert arrays["scale"].dtype == np.float16 and arrays["q"].dtype == np.int32
    got = builders.run_ort(result.model, feeds)
    assert got[0].dtype == np.float16 and builders.rel_l2(expected, got) < 0.03


def test_initializers_listed_as_graph_inputs_do_not_become_inputs():
    model = builders.mlp()
    for tensor in model.graph.initializer:        # IR 3 style: initializers also in graph.input
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    feeds = builders.random_inputs(model)
    result, _ = apply(model, {"weights": {"bits": 8}})
    assert {i.name for i in result.model.graph.input} == {"x", "b1", "b2"}
    builders.run_ort(result.model, feeds)


def test_include_exclude_select_weights():
    result, ctx = apply(builders.mlp(), {"weights": {"bits": 8}, "include": ["fc2"]})
    assert set(ctx.layers) == {"W2"}
    result, ctx = apply(builders.mlp(), {"weights": {"bits": 8}, "exclude": ["W2"]})
    assert set(ctx.layers) == {"W1"}


def test_lstm_inside_an_if_gets_int8_recurrent_weights_weight_only():
    model = builders.lstm_in_if()
    result, _ = apply(model, {"weights": {"bits": 8}, "min_params": 0})
    quantized = {node.output[0] for node in result.model.graph.node if node.op_type == "DequantizeLinear"}
    assert {"lstm_W", "lstm_R"} <= quantized
    sample = {"x": np.random.default_rng(2).standard_normal((5, 1, 32)).astype(np.float32)}
    assert builders.rel_l2(builders.run_ort(model, sample), builders.run_ort(result.model, sample)) < 0.03
