"""Static int8's accuracy passes on small models built here, each with an oracle: excluded layers
compute on float inputs, GELU-fed MatMuls and few-product (depthwise) convs keep float activations
with int8 weights, BatchNormalization parameters held in Constant nodes are folded, and identical
small initializers are stored once with outputs bit-identical."""
from __future__ import annotations

import types

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline import graph
from worker.pipeline.quantize import small_tensors, weight_only_compute
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext


def _run(model, calibration, **overrides):
    fields = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}, "min_params": 0}
    fields.update(overrides)
    ctx = StepContext(original=model, calibration=calibration)
    result = quantize_static(model, QuantizeStep(**fields), ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result, ctx


def _producer_op(model, tensor):
    node = graph.producers(model).get(tensor)
    return node.op_type if node is not None else None


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _conv_chain(seed: int = 0, depthwise: bool = False) -> onnx.ModelProto:
    """x[batch, 16, 8, 8] -> conv1 3x3 (16) -> Relu -> conv2 3x3 (16, depthwise or dense) -> y."""
    rng = np.random.default_rng(seed)
    w2 = rng.standard_normal((16, 1 if depthwise else 16, 3, 3)).astype(np.float32) / (3 if depthwise else 12)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12, "conv1.W"),
             numpy_helper.from_array(w2, "conv2.W")]
    nodes = [helper.make_node("Conv", ["x", "conv1.W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "conv2.W"], ["y"], name="conv2", pads=[1, 1, 1, 1],
                              group=16 if depthwise else 1)]
    return builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])], inits)


def _gelu_mlp(seed: int = 0, d: int = 64, hidden: int = 256) -> onnx.ModelProto:
    """x[batch, d] -> MatMul up -> GELU as torch exports it (x * 0.5 * (1 + erf(x / sqrt 2))) -> MatMul down."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(builders._w(rng, d, hidden), "up.W"),
             numpy_helper.from_array(builders._w(rng, hidden, d), "down.W"),
             numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "up.W"], ["h"], name="up"),
             helper.make_node("Div", ["h", "sqrt2"], ["h_scaled"], name="gelu_div"),
             helper.make_node("Erf", ["h_scaled"], ["h_erf"], name="gelu_erf"),
             helper.make_node("Add", ["h_erf", "one"], ["h_plus"], name="gelu_add"),
             helper.make_node("Mul", ["h", "h_plus"], ["h_mul"], name="gelu_mul"),
             helper.make_node("Mul", ["h_mul", "half"], ["g"], name="gelu_half"),
             helper.make_node("MatMul", ["g", "down.W"], ["y"], name="down")]
    return builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])], inits)


def test_an_excluded_layer_reads_the_float_tensor_not_its_neighbours_dequantized_output():
    model = _conv_chain()
    calibration = {"x": np.random.default_rng(1).standard_normal((64, 16, 8, 8)).astype(np.float32)}
    result, _ = _run(model, calibration, exclude=["conv2"])
    quantized = result.model
    conv2 = _node(quantized, "conv2")
    assert conv2.input[1] == "conv2.W" and "conv2.W" in graph.initializers(quantized)   # its weight float
    # its input: the float ReLU output, not the DequantizeLinear the quantized conv1's output grid
    # writes (before the fix it read that, and took its rounding error)
    assert _producer_op(quantized, conv2.input[0]) == "Relu"
    relu = _node(quantized, "relu1")
    assert _producer_op(quantized, relu.input[0]) == "Conv"
    # conv1 itself stays quantized: int8 weight, its input on a grid
    conv1 = _node(quantized, "conv1")
    assert [_producer_op(quantized, name) for name in conv1.input[:2]] == ["DequantizeLinear"] * 2
    # a layer that is not excluded still reads the grid (the ReLU folded into conv1's output grid)
    full, _ = _run(model, calibration)
    assert _producer_op(full.model, _node(full.model, "conv2").input[0]) == "DequantizeLinear"


def test_a_matmul_reading_a_gelu_output_keeps_float_activations_with_int8_weights():
    model = _gelu_mlp()
    calibration = {"x": np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)}
    assert "g" in weight_only_compute.gelu_outputs(model)
    assert "h" not in weight_only_compute.gelu_outputs(model)
    # uint8 + 128 storage (what AVX2 without VNNI gets) is for integer kernels: the float layer's
    # weight stays int8 whatever the host
    result, ctx = _run(model, calibration, integer_weights="uint8")
    quantized = result.model
    down = _node(quantized, "down")
    assert _producer_op(quantized, down.input[0]) == "Mul"          # the GELU output itself, float
    assert _producer_op(quantized, down.input[1]) == "DequantizeLinear"
    assert graph.initializers(quantized)[_node(quantized, down.input[1] + "_DequantizeLinear").input[0]].data_type \
        == TensorProto.INT8
    up = _node(quantized, "up")
    assert _producer_op(quantized, up.input[0]) == "DequantizeLinear"   # the other layer stays integer
    assert graph.initializers(quantized)[_node(quantized, up.input[1] + "_DequantizeLinear").input[0]].data_type \
        == TensorProto.UINT8
    assert ctx.layers["down.W"].extra["weight_storage"] == "int8"
    assert result.metrics["float_activation_layers"] == 1
    assert "GELU" in ctx.layers["down.W"].extra["activations"]
    reference = builders.run_ort(model, calibration)[0]
    integer, _ = _run(model, calibration, float_gelu_inputs=False)
    assert _producer_op(integer.model, _node(integer.model, "down").input[0]) == "DequantizeLinear"
    assert builders.rel_l2(reference, builders.run_ort(quantized, calibration)[0]) < \
        builders.rel_l2(reference, builders.run_ort(integer.model, calibration)[0])


def test_a_depthwise_conv_keeps_float_activations_and_a_dense_one_does_not():
    calibration = {"x": np.random.default_rng(1).standard_normal((32, 16, 8, 8)).astype(np.float32)}
    depthwise = _conv_chain(depthwise=True)
    layers = graph.weight_layers(depthwise, ops=("Conv",))
    assert [weight_only_compute.products_per_output(layer) for layer in layers] == [144, 9]
    result, ctx = _run(depthwise, calibration)
    conv2 = _node(result.model, "conv2")
    assert _producer_op(result.model, conv2.input[1]) == "DequantizeLinear"      # int8 weight
    # no Q/DQ of conv2's own: its output is the graph's, float; its input is conv1's grid only
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "y" for n in result.model.graph.node)
    assert "9 products" in ctx.layers["conv2.W"].extra["activations"]
    dense, _ = _run(_conv_chain(depthwise=False), calibration)
    assert dense.metrics["float_activation_layers"] == 0
    off, _ = _run(depthwise, calibration, min_products=0)
    assert off.metrics["float_activation_layers"] == 0


def _batchnorm_in_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every BatchNormalization parameter in a Constant node (as paddle2onnx writes)."""
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    wanted = {name for n in moved.graph.node if n.op_type == "BatchNormalization" for name in n.input[1:5]}
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}")
                 for t in moved.graph.initializer if t.name in wanted]
    kept = [t for t in moved.graph.initializer if t.name not in wanted]
    del moved.graph.initializer[:]
    moved.graph.initializer.extend(kept)
    nodes = constants + list(moved.graph.node)
    del moved.graph.node[:]
    moved.graph.node.extend(nodes)
    onnx.checker.check_model(moved, full_check=True)
    return moved


def test_batchnorm_with_parameters_in_constant_nodes_is_folded_into_the_conv():
    model = _batchnorm_in_constants(builders.cnn_bn())
    calibration = {"x": np.random.default_rng(1).uniform(0, 1, (128, 1, 8, 8)).astype(np.float32)}
    result, _ = _run(model, calibration, min_products=0)
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]
    reference = builders.run_ort(model, calibration)
    assert builders.rel_l2(reference, builders.run_ort(result.model, calibration)) < 0.05


def test_identical_small_initializers_are_stored_once_with_outputs_bit_identical():
    model = _conv_chain(depthwise=False)
    calibration = {"x": np.random.default_rng(1).standard_normal((16, 16, 8, 8)).astype(np.float32)}
    result, _ = _run(model, calibration)
    quantized = result.model
    before = builders.run_ort(quantized, calibration)[0]
    count = len(quantized.graph.initializer)
    # both convs' per-channel weight zero points are 16 int8 zeros: one of them goes
    dropped = small_tensors.share_identical(quantized)
    assert dropped >= 1 and len(quantized.graph.initializer) == count - dropped
    onnx.checker.check_model(quantized, full_check=True)
    np.testing.assert_array_equal(builders.run_ort(quantized, calibration)[0], before)
    keys = [(t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in quantized.graph.initializer
            if numpy_helper.to_array(t).nbytes <= small_tensors.MAX_BYTES]
    assert len(keys) == len(set(keys))
    assert small_tensors.share_identical(quantized) == 0


def _pooled_conv(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 32, 4, 4] -> GlobalAveragePool -> 1x1 Conv (32 -> 16, with bias) -> y: an SE block's
    first conv, which sees one value per channel per sample."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(builders._w(rng, 16, 32, 1, 1), "se.W"),
             numpy_helper.from_array(np.zeros(16, np.float32), "se.b")]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"], name="pool"),
             helper.make_node("Conv", ["pooled", "se.W", "se.b"], ["y"], name="se")]
    return builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, 4, 4])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 1, 1])], inits)


def test_bias_correction_leaves_a_layer_whose_mean_rests_on_too_few_values():
    from worker.pipeline.quantize import bias_correction

    model = _pooled_conv()
    rng = np.random.default_rng(3)
    few = {"x": rng.uniform(0, 1, (bias_correction.MIN_OBSERVATIONS // 8, 32, 4, 4)).astype(np.float32)}
    many = {"x": rng.uniform(0, 1, (bias_correction.MIN_OBSERVATIONS * 2, 32, 4, 4)).astype(np.float32)}
    assert _run(model, few, min_products=0)[0].metrics["bias_corrected"] == 0
    assert _run(model, many, min_products=0)[0].metrics["bias_corrected"] == 1


def test_bias_correction_stops_reading_once_every_layer_has_enough_rows(monkeypatch):
    # 1x1 conv on 4 x 4 maps: 16 rows per channel per sample, so STOP_ROWS rows come after
    # STOP_ROWS / 16 samples; the pass must not read the rest of the calibration set
    from worker.pipeline import activations
    from worker.pipeline.quantize import bias_correction

    rng = np.random.default_rng(4)
    model = builders.pointwise_conv(rng, 32, 16, 4)
    samples = 2 * bias_correction.STOP_ROWS // 16
    data = {"x": rng.uniform(0, 1, (samples, 32, 4, 4)).astype(np.float32)}
    read = _count_reads(monkeypatch, activations, bias_correction)
    assert _run(model, data, min_products=0)[0].metrics["bias_corrected"] == 1
    assert bias_correction.STOP_ROWS // 16 <= sum(read) < samples


def test_bias_correction_reads_min_samples_even_when_one_sample_fills_its_rows(monkeypatch):
    # a 32 x 32 map gives 1024 rows per channel from one sample, all from one input's content
    from worker.pipeline import activations
    from worker.pipeline.quantize import bias_correction

    rng = np.random.default_rng(6)
    model = builders.pointwise_conv(rng, 8, 8, 32)
    samples = bias_correction.MIN_SAMPLES * 4
    data = {"x": rng.uniform(0, 1, (samples, 8, 32, 32)).astype(np.float32)}
    read = _count_reads(monkeypatch, activations, bias_correction)
    assert _run(model, data, min_products=0)[0].metrics["bias_corrected"] == 1
    assert bias_correction.MIN_SAMPLES <= sum(read) < samples


def test_bias_correction_of_a_pooled_layer_stops_at_its_minimum_observations(monkeypatch):
    # one row per sample after a global pool never reaches STOP_ROWS: the pass must stop once the
    # layer's mean rests on MIN_OBSERVATIONS rows rather than read the whole calibration set
    from worker.pipeline import activations
    from worker.pipeline.quantize import bias_correction

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(builders._w(rng, 32, 32, 1, 1), "c.W"),
             numpy_helper.from_array(np.zeros(32, np.float32), "c.b"),
             numpy_helper.from_array(builders._w(rng, 16, 32, 1, 1), "se.W"),
             numpy_helper.from_array(np.zeros(16, np.float32), "se.b")]
    nodes = [helper.make_node("Conv", ["x", "c.W", "c.b"], ["c"], name="c"),          # 64 rows per sample
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["pooled"], name="pool"),   # 1 row per sample
             helper.make_node("Conv", ["pooled", "se.W", "se.b"], ["y"], name="se")]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, 8, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 1, 1])], inits)
    samples = bias_correction.MIN_OBSERVATIONS * 4
    data = {"x": rng.uniform(0, 1, (samples, 32, 8, 8)).astype(np.float32)}
    read = _count_reads(monkeypatch, activations, bias_correction)
    assert _run(model, data, min_products=0)[0].metrics["bias_corrected"] == 2
    assert bias_correction.MIN_OBSERVATIONS <= sum(read) < samples // 2


def _count_reads(monkeypatch, activations, bias_correction) -> list[int]:
    """Samples per batch that bias correction's pass reads (appended as it reads them)."""
    read: list[int] = []
    original = activations.capture_counted

    def counting(*args, **kwargs):
        for count, batch in original(*args, **kwargs):
            read.append(len(next(iter(batch.values()))))
            yield count, batch

    # bias correction's own view of the module: calibration's pass reads through it too
    monkeypatch.setattr(bias_correction, "activations", types.SimpleNamespace(capture_counted=counting))
    return read
