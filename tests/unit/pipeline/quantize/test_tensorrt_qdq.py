"""TensorRT's symmetric per-channel int8 QDQ: the form itself, and static int8 takes it only for a
gpu job where TensorRT is present."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from core.recipe import parse_recipe
from worker.pipeline import host
from worker.pipeline.quantize import tensorrt_qdq
from worker.pipeline.quantize.static import quantize_static
from worker.pipeline.step import StepContext
from tests.unit.pipeline import builders


def test_tensorrt_form_is_symmetric_per_channel():
    params = parse_recipe("steps:\n  - op: quantize\n    weights: {bits: 8, symmetric: false, granularity: tensor}\n"
                          "    activations: {calibration: minmax}\n").steps[0]
    adapted = tensorrt_qdq.tensorrt_form(params)
    assert adapted.activations.symmetric and adapted.weights.symmetric and adapted.weights.granularity == "channel"
    assert not params.activations.symmetric      # the recipe itself is untouched


@pytest.mark.parametrize("target, trt, symmetric", [("gpu", True, True), ("gpu", False, False), ("cpu-x86", True, False)])
def test_static_int8_takes_tensorrt_form_only_for_gpu_with_tensorrt(monkeypatch, target, trt, symmetric):
    monkeypatch.setattr(host, "tensorrt_present", lambda: trt)
    model = builders.mlp(inputs=64, hidden=64, classes=4)
    data = {"x": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)}
    params = parse_recipe("steps:\n  - op: quantize\n    weights: {bits: 8}\n    activations: {calibration: minmax}\n").steps[0]
    ctx = StepContext(original=model, calibration=data, target=target)
    result = quantize_static(model, params, ctx)
    zero_points = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer
                   if t.name in {n.input[2] for n in result.model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}]
    assert zero_points
    assert all(z.dtype == (np.int8 if symmetric else np.uint8) for z in zero_points)
    if symmetric:
        assert all((z == 0).all() for z in zero_points)
        assert ctx.options[host.CHOICES_KEY][-1]["choice"] == "int8 QDQ form"
