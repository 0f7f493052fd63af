"""worker.pipeline.export.float_graph: the compressed model as a plain float graph computes what the
compressed model computes (up to the activation rounding it leaves to the next converter)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import runner
from worker.pipeline.export.float_graph import float_graph


def _compressed(tmp_path: Path, model: onnx.ModelProto, steps: list) -> onnx.ModelProto:
    path = tmp_path / "in.onnx"
    onnx.save_model(model, str(path))
    data = builders.random_inputs(model, 32)
    result = runner.run(path, parse_recipe({"steps": steps}), calibration=data, workdir=tmp_path / "work",
                        options={"latency_runs": 2, "latency_budget_s": 0.1, "layer_errors": False})
    return onnx.load(str(result.model_path))


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_static_int8_keeps_the_relu_folded_into_a_quantization_range(tmp_path):
    model = builders.cnn_bn()
    compressed = _compressed(tmp_path, model, [{"op": "quantize", "weights": {"bits": 8}, "activations": {"bits": 8},
                                                "min_params": 16, "min_products": 0}])   # conv1 in int8 too
    assert "Relu" not in {n.op_type for n in compressed.graph.node}   # the quantizer folded it into [0, max]
    plain, counts = float_graph(compressed)
    onnx.checker.check_model(plain, full_check=True)
    ops = {n.op_type for n in plain.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"} and "Clip" in ops
    assert counts["activation_qdq_to_clip"] >= 3
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in plain.graph.initializer)
    feeds = builders.random_inputs(model, 16, seed=4)
    want, got = builders.run_ort(compressed, feeds)[0], builders.run_ort(plain, feeds)[0]
    assert _cosine(want, got) >= 0.999 and np.mean(want.argmax(1) == got.argmax(1)) >= 0.9


@pytest.mark.parametrize("steps", [
    [{"op": "quantize", "weights": {"bits": 4, "granularity": "block"}, "format": "matmulnbits"}],
    [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}],
], ids=["matmulnbits", "dynamic"])
def test_onnx_runtime_fused_matmuls_become_float_matmuls(tmp_path, steps):
    model = builders.mlp(inputs=64, hidden=128, classes=8)
    compressed = _compressed(tmp_path, model, steps)
    assert any(n.domain == "com.microsoft" for n in compressed.graph.node)
    plain, counts = float_graph(compressed)
    assert counts["contrib_matmuls_to_float"] == 2
    assert not any(n.domain == "com.microsoft" for n in plain.graph.node)
    feeds = builders.random_inputs(model, 16, seed=4)
    assert _cosine(builders.run_ort(compressed, feeds)[0], builders.run_ort(plain, feeds)[0]) >= 0.999
