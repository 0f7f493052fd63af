"""All-zero DequantizeLinear zero points left out: the same outputs, the same fused integer kernels,
fewer bytes; a zero point a QuantizeLinear shares, a MatMul / Gemm weight's (ONNX Runtime's QGemm
needs it) or a non-zero one stays."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from core.recipe import QuantizeStep
from tests.unit.pipeline import builders
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.quantize.zero_points import drop_zero_points
from worker.pipeline.step import StepContext


def _fused_ops(model: onnx.ModelProto, path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _static_int8(model, calibration):
    """Every layer in int8, conv1 (one input channel, few products per output) included; weights
    stored int8 whatever this host's CPU (uint8 + 128 on AVX2 without VNNI has zero points of 128)."""
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=0,
                          min_products=0, integer_weights="int8")
    return quantize_static(model, params, StepContext(original=model, calibration=calibration)).model


def test_zero_points_of_weights_and_biases_go_the_rest_stays(tmp_path):
    model = builders.cnn_bn()
    calibration = builders.random_inputs(model, count=32)
    quantized = _static_int8(model, calibration)
    before = onnx.ModelProto()
    before.CopyFrom(quantized)
    dropped = drop_zero_points(quantized)
    onnx.checker.check_model(quantized, full_check=True)
    assert dropped and quantized.ByteSize() < before.ByteSize()
    inits = {t.name for t in quantized.graph.initializer}
    for node in quantized.graph.node:      # every QuantizeLinear keeps its zero point (it sets the type)
        if node.op_type == "QuantizeLinear":
            assert len(node.input) == 3 and node.input[2] in inits
    assert {"conv1.W_zero_point", "conv2.W_zero_point", "conv1.W_bias_zero_point"} <= set(dropped)
    assert "fc.W_zero_point" not in dropped          # the Gemm's weight: QGemm needs it
    np.testing.assert_array_equal(builders.run_ort(before, calibration)[0], builders.run_ort(quantized, calibration)[0])
    fused_before, fused_after = _fused_ops(before, tmp_path / "a.onnx"), _fused_ops(quantized, tmp_path / "b.onnx")
    assert fused_before["QLinearConv"] == 2 and fused_before["QGemm"] == 1 and fused_after == fused_before


def test_matmul_weights_keep_their_zero_points(tmp_path):
    model = builders.mlp()
    calibration = builders.random_inputs(model, count=32)
    quantized = _static_int8(model, calibration)
    fused_before = _fused_ops(quantized, tmp_path / "a.onnx")
    assert not {"W1_zero_point", "W2_zero_point"} & set(drop_zero_points(quantized))
    assert _fused_ops(quantized, tmp_path / "b.onnx") == fused_before


def test_a_non_zero_zero_point_stays():
    model = builders.cnn_bn()
    calibration = builders.random_inputs(model, count=16)
    params = QuantizeStep(op="quantize", weights={"bits": 8, "symmetric": False}, activations={"calibration": "minmax"},
                          min_params=0)
    quantized = quantize_static(model, params, StepContext(original=model, calibration=calibration)).model
    weight_dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "conv2.W"]
    drop_zero_points(quantized)
    assert len(weight_dq[0].input) == 3      # asymmetric weights: their zero points are not zero
