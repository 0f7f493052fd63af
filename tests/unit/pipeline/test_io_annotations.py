"""finalize.restore_io_annotations: a shape annotation that a step's opset upgrade rewrote is no
interface change (int4 GPTQ on an opset-11 sentence encoder failed its output check on it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import PipelineError
from core.recipe import parse_recipe
from worker.pipeline import finalize, runner
from worker.pipeline.graph import opset as graph_opset

FAST = {"latency_runs": 3, "latency_budget_s": 0.5}


def _encoder(dim: str | int = "Divsentence_embedding_dim_1") -> onnx.ModelProto:
    """x[batch, 64] @ W -> L2-normalised, at opset 11, its output's second axis symbolic (as
    torch.onnx exports name it); the version converter to opset 21 rewrites it to 64."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj"),
             helper.make_node("ReduceL2", ["y"], ["norm"], axes=[1], keepdims=1, name="norm"),
             helper.make_node("Div", ["y", "norm"], ["sentence_embedding"], name="normalise")]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", dim])],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_int4_gptq_keeps_a_symbolic_output_annotation(tmp_path: Path):
    path = tmp_path / "encoder.onnx"
    onnx.save_model(_encoder(), str(path))
    recipe = parse_recipe({"steps": [{"op": "quantize", "method": "gptq",
                                      "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]})
    calibration = {"x": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    result = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "w", options=FAST)
    written = onnx.load(str(result.model_path))
    dims = [d.dim_param or d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "Divsentence_embedding_dim_1"]
    assert graph_opset(written) >= 21


def test_two_fixed_sizes_that_disagree_are_still_an_interface_change():
    original, changed = _encoder(64), _encoder(64)
    changed.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 32
    assert finalize.restore_io_annotations(original, changed) == []
    with pytest.raises(PipelineError, match="outputs differ"):
        runner.check_result(original, changed)


def test_a_symbolic_axis_made_concrete_takes_the_original_annotation_back():
    original, changed = _encoder(), _encoder(64)
    assert finalize.restore_io_annotations(original, changed) == ["sentence_embedding"]
    assert changed.graph.output[0].type == original.graph.output[0].type
