"""The file's names (``file_names``): tensors and nodes the steps invented get short names or none,
every name the original had stays, the model computes exactly the same, bodies keep what they read,
and the report reads the file under the steps' names (its per-layer SQNR still found)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_quantize_weight_only import apply
from worker.pipeline import file_names, runner
from worker.pipeline.quantize import small_tensors


def _static_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    calibration = builders.random_inputs(model, count=16)
    result, _ = apply(model, {"weights": {"bits": 8}, "activations": {"bits": 8, "calibration": "minmax"},
                              "min_params": 0}, calibration=calibration)
    return result.model


def test_shorten_keeps_the_originals_names_and_the_outputs_exactly():
    original = builders.cnn_bn()
    quantized = _static_int8(original)
    feeds = builders.random_inputs(original, count=4)
    expected = builders.run_ort(quantized, feeds)
    before = onnx.ModelProto()
    before.CopyFrom(quantized)

    cleared = file_names.clear_added_node_names(quantized, original)
    names = file_names.shorten(quantized, original)

    assert cleared > 0 and names
    onnx.checker.check_model(quantized, full_check=True)
    assert builders.io_of(quantized) == builders.io_of(before)
    for got, want in zip(builders.run_ort(quantized, feeds), expected):
        np.testing.assert_array_equal(got, want)
    originals = file_names.tensor_names(original)
    now = file_names.tensor_names(quantized)
    # every name the original had and the quantized model still uses is still there
    assert originals & file_names.tensor_names(before) <= now
    assert all(len(new) <= 2 and old not in originals for new, old in names.items())
    assert file_names.node_names(quantized) <= file_names.node_names(original)
    assert quantized.ByteSize() < before.ByteSize()
    # the report's view: the steps' names back
    file_names.restore(quantized, names)
    assert file_names.tensor_names(quantized) == file_names.tensor_names(before)


def test_a_name_a_body_reads_is_kept():
    """An If branch reads a tensor the steps invented in the main graph (a hoisted, dequantized
    weight): renaming it would need the body renamed too, so it keeps its name."""
    original = builders.lstm_in_if()
    quantized = onnx.ModelProto()
    quantized.CopyFrom(original)
    # a step renamed the main-graph tensor the branch reads ("h"), in both places
    invented = "h_rewritten_by_a_step"
    branches = [attribute.g for attribute in next(n for n in quantized.graph.node if n.op_type == "If").attribute]
    for graph in (quantized.graph, *branches):
        for node in graph.node:
            node.input[:] = [invented if name == "h" else name for name in node.input]
            node.output[:] = [invented if name == "h" else name for name in node.output]
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 1, 32)).astype(np.float32)}
    expected = builders.run_ort(quantized, feeds)

    names = file_names.shorten(quantized, original)

    assert invented not in names.values()
    assert invented in file_names.tensor_names(quantized)
    for got, want in zip(builders.run_ort(quantized, feeds), expected):
        np.testing.assert_array_equal(got, want)


def test_lifted_constants_are_shared_and_compute_the_same():
    """Three Constant nodes holding the same scalar (an exporter writes one per use): lifted to
    initializers and stored once, the same outputs."""
    nodes = [helper.make_node("Constant", [], [f"six_{i}"], value=numpy_helper.from_array(np.array(6.0, np.float32)))
             for i in range(3)]
    nodes += [helper.make_node("Add", ["x", "six_0"], ["a"]), helper.make_node("Mul", ["a", "six_1"], ["b"]),
              helper.make_node("Div", ["b", "six_2"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    expected = builders.run_ort(model, feeds)

    assert small_tensors.lift_constants(model) == 3
    assert small_tensors.share_identical(model) == 2

    assert [n.op_type for n in model.graph.node] == ["Add", "Mul", "Div"]
    assert len(model.graph.initializer) == 1
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(builders.run_ort(model, feeds)[0], expected[0])


def test_the_runner_writes_short_names_and_reports_under_the_steps_names(tmp_path):
    path = tmp_path / "cnn.onnx"
    original = builders.cnn_bn()
    onnx.save(original, str(path))
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"},
                                      "min_params": 0}]})
    outcome = runner.run(path, recipe, workdir=tmp_path / "work", calibration=builders.random_inputs(original, count=16),
                         options={"latency_runs": 3, "layer_errors": False})
    written = onnx.load(str(outcome.model_path))
    row = outcome.report["steps"][0]
    assert row["names_shortened"] > 0
    assert not any(name.endswith(("_quantized", "_scale")) for name in file_names.tensor_names(written))
    assert builders.io_of(written) == builders.io_of(original)
    # the per-layer SQNR is read from the stored integers under the names the step wrote
    assert all(layer["sqnr_db"] is not None and layer["sqnr_db"] > 10 for layer in outcome.report["layers"])


def test_a_lossless_recipe_on_an_unnamed_export_writes_no_larger_file(tmp_path):
    """The runner names every node for the steps' records; the file keeps the upload's (here: no)
    names. A cleanup of an unnamed export came out 79 bytes larger than it went in."""
    model = builders.mlp()
    for node in model.graph.node:
        node.ClearField("name")
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, path)
    result = runner.run(path, parse_recipe({"steps": [{"op": "cleanup"}]}), workdir=tmp_path / "w",
                        options={"latency_runs": 2, "latency_budget_s": 0.5, "layer_errors": False})
    written = onnx.load(result.model_path)
    assert not any(node.HasField("name") for node in written.graph.node)
    assert result.model_path.stat().st_size <= path.stat().st_size
