"""params / nonzero_params count the weights a MatMulNBits node encodes, not its packed bytes."""
import numpy as np
import onnx

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import metrics, runner


def test_matmulnbits_counts_weights_and_keeps_pruned_zeros(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(inputs=128, hidden=256, classes=16), str(path))
    recipe = parse_recipe({"steps": [
        {"op": "prune", "sparsity": 0.5, "scope": "layer"},
        {"op": "quantize", "format": "matmulnbits", "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]})
    result = runner.run(path, recipe, workdir=tmp_path / "work", options={"layer_errors": False, "latency_runs": 3})
    model = onnx.load(str(result.model_path))
    assert any(node.op_type == "MatMulNBits" for node in model.graph.node)
    params, nonzero = metrics.param_counts(model)
    weights = 128 * 256 + 256 * 16
    scales = 128 // 32 * 256 + 256 // 32 * 16
    biases = 256 + 16
    assert params == weights + scales + biases
    # half the weights were pruned to zero and stay exactly at their zero point after quantization;
    # of the kept half, only those that round to zero do not count
    assert 0.40 * weights <= nonzero - scales - biases <= 0.5 * weights
    assert result.report["compressed"]["params"] == params
