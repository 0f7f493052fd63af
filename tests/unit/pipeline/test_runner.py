"""worker.pipeline.runner: checks before work, steps in order with progress and cancellation,
the output contract, and the report (docs/report.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core.errors import InvalidInput, InvalidModel, RecipeError
from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import runner
from worker.pipeline.step import StepCancelled

FAST = {"latency_runs": 5, "latency_budget_s": 1.0}
INT8 = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(), str(path))
    return path


def test_report_has_every_contract_field(mlp_path: Path, tmp_path: Path):
    stages = []
    result = runner.run(mlp_path, parse_recipe(INT8), workdir=tmp_path / "work", options=FAST,
                        progress=lambda fraction, stage: stages.append((fraction, stage)))
    report = result.report
    assert result.model_path == tmp_path / "work" / "model.onnx" and result.model_path.exists()
    assert (tmp_path / "work" / "report.json").exists()
    for side in ("original", "compressed"):
        assert set(report[side]) >= {"bytes", "params", "macs", "latency_ms"}
        assert report[side]["latency_ms"]["p50"] > 0 and report[side]["latency_ms"]["p95"] >= report[side]["latency_ms"]["p50"]
    assert report["compressed"]["nonzero_params"] <= report["compressed"]["params"]
    # MACs of one sample: 128*256 + 256*16, unchanged by weight-only quantization
    assert report["original"]["macs"] == 128 * 256 + 256 * 16 == report["compressed"]["macs"]
    assert report["original"]["params"] == 128 * 256 + 256 + 256 * 16 + 16
    assert report["size_ratio"] >= 3.5
    assert report["transport_size_ratio"] > 1.0
    assert report["fidelity_data"] == "generated"
    assert set(report["fidelity"]) == {"rel_l2", "cosine", "top1_agreement"}
    assert report["fidelity"]["rel_l2"] < 0.03 and report["fidelity"]["cosine"] > 0.999
    assert report["accuracy"] is None
    assert report["provider"] == "CPUExecutionProvider" and report["target"] == "cpu-x86"
    assert [s["op"] for s in report["steps"]] == ["quantize"] and report["steps"][0]["seconds"] > 0
    # auto: each MatMul in whichever form ran faster here, measured per layer
    assert set(report["steps"][0]["formats"]) == {"W1", "W2"}
    assert set(report["steps"][0]["format_latency_ms"]["W1"]) == {"qdq", "matmulnbits"}
    layers = {row["name"]: row for row in report["layers"]}
    assert set(layers) == {"W1", "W2"}
    for row in layers.values():
        assert row["bits"] == 8 and row["sqnr_db"] > 35 and 0 <= row["output_rel_l2"] < 0.03
    assert layers["W1"]["params"] == 128 * 256 and layers["W1"]["op"] == "MatMul"
    assert stages[0] == (0.0, "step 1/1: quantize") and stages[-1] == (1.0, "done")
    assert [f for f, _ in stages] == sorted(f for f, _ in stages)


def test_evaluation_data_with_labels_gives_accuracy(mlp_path: Path, tmp_path: Path):
    model = builders.mlp()
    evaluation = builders.random_inputs(model, count=40)
    evaluation["_labels"] = np.argmax(builders.run_ort(model, evaluation)[0], axis=1)
    report = runner.run(mlp_path, parse_recipe(INT8), evaluation=evaluation, workdir=tmp_path / "w",
                        options=FAST).report
    assert report["fidelity_data"] == "evaluation" and report["fidelity_samples"] == 40
    assert report["accuracy"]["original"] == 1.0
    assert report["accuracy"]["compressed"] >= 0.9
    assert report["fidelity"]["top1_agreement"] == report["accuracy"]["compressed"]


def test_calibration_needed_but_missing_is_refused_with_the_field_path(mlp_path: Path, tmp_path: Path):
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "block"},
                                      "method": "gptq"}]})
    with pytest.raises(RecipeError) as info:
        runner.run(mlp_path, recipe, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == ["steps", 0, "method"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("arrays, loc", [
    ({"x": np.zeros((4, 100), np.float32)}, ["calibration", "x"]),        # wrong feature size
    ({"x": np.zeros((4,), np.float32)}, ["calibration", "x"]),            # wrong rank
    ({"x": np.zeros((4, 128), np.float32), "y": np.zeros(4)}, ["calibration", "y"]),   # unknown name
    ({"x": np.full((4, 128), np.nan, np.float32)}, ["calibration", "x"]),
])
def test_calibration_that_does_not_fit_is_refused_before_work(mlp_path, tmp_path, monkeypatch, arrays, loc):
    from worker.pipeline.quantize import weight_only

    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the data was checked")

    monkeypatch.setattr(weight_only, "quantize_weights", must_not_run)
    with pytest.raises(InvalidInput) as info:
        runner.run(mlp_path, parse_recipe(INT8), calibration=arrays, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == loc
    assert not (tmp_path / "w" / "model.onnx").exists()


def test_evaluation_data_is_checked_too(mlp_path, tmp_path):
    with pytest.raises(InvalidInput) as info:
        runner.run(mlp_path, parse_recipe(INT8), evaluation={"x": np.zeros((3, 5), np.float32)}, workdir=tmp_path)
    assert info.value.errors[0]["loc"] == ["evaluation", "x"]


@pytest.mark.parametrize("bad, says", [(16, "class id 16; the model's output 'logits' scores 16 classes (ids 0..15)"),
                                       (-1, "class id -1; class ids count from 0")])
def test_labels_the_model_cannot_output_are_refused(mlp_path, tmp_path, bad, says):
    # they would count as misses and lower both accuracies without a word (ids from 1, -1 for none)
    model = builders.mlp()
    evaluation = builders.random_inputs(model, count=8)
    evaluation["_labels"] = np.array([0, 3, 15, bad, 2, 1, 0, 4])
    with pytest.raises(InvalidInput) as info:
        runner.run(mlp_path, parse_recipe(INT8), evaluation=evaluation, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == ["evaluation", "_labels"] and says in str(info.value)


def transposed_weight_mlp() -> onnx.ModelProto:
    """As PyTorch exports with do_constant_folding=False: each Linear is W[out, in] -> Transpose ->
    MatMul; the second weight is also read by a Gather (tied), so its Transpose must stay."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) / 6, "fc1.weight"),
             numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32) / 8, "fc2.weight")]
    nodes = [helper.make_node("Transpose", ["fc1.weight"], ["w1t"], perm=[1, 0], name="t1"),
             helper.make_node("MatMul", ["x", "w1t"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Transpose", ["fc2.weight"], ["w2t"], name="t2"),
             helper.make_node("MatMul", ["r", "w2t"], ["y"], name="fc2"),
             helper.make_node("Gather", ["fc2.weight", "ids"], ["rows"], name="tied")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16]),
                           helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 64])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_read_through_a_transpose_are_quantized(tmp_path):
    # such a model was refused as weightless ("no Conv / MatMul / Gemm weight has 1024 or more elements")
    path = tmp_path / "t.onnx"
    model = transposed_weight_mlp()
    onnx.save_model(model, str(path))
    data = {"x": np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32),
            "ids": np.arange(32, dtype=np.int64) % 16}
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {}}]})
    result = runner.run(path, recipe, calibration=data, evaluation=data, workdir=tmp_path / "w", options=FAST)
    quantized = onnx.load(str(result.model_path))
    layers = {row["name"]: row for row in result.report["layers"]}
    assert layers["fc1.weight"]["bits"] == 8 and layers["fc1.weight"]["op"] == "MatMul"
    assert "t1" not in {node.name for node in quantized.graph.node}          # folded into the stored weight
    assert result.report["fidelity"]["rel_l2"] < 0.05
    expected, got = builders.run_ort(model, data), builders.run_ort(quantized, data)
    assert builders.rel_l2(expected[:1], got[:1]) < 0.05 and np.allclose(expected[1], got[1], atol=0.02)


@pytest.mark.parametrize("step, bits", [({"op": "quantize", "weights": {"bits": 8}, "activations": {}}, 8),
                                        ({"op": "quantize", "weights": {"bits": 8},
                                          "activations": {"calibration": "dynamic"}}, 8),
                                        ({"op": "cluster", "bits": 6}, 6)])
def test_a_table_only_a_loop_body_gathers_from_is_compressed(tmp_path, step, bits):
    # an EmbeddingBag's table (a Loop over the bags gathers from it) stayed float32 and unlisted
    path = tmp_path / "bag.onnx"
    model = builders.bag_in_loop()
    onnx.save_model(model, str(path))
    data = {"ids": np.random.default_rng(2).integers(0, 200, (24, 4)).astype(np.int64)}
    result = runner.run(path, parse_recipe({"steps": [step]}), calibration=data, evaluation=data,
                        workdir=tmp_path / "w", options=FAST)
    layers = {row["name"]: row for row in result.report["layers"]}
    assert layers["table"]["bits"] == bits
    compressed = onnx.load(str(result.model_path))
    assert "table" not in {t.name for t in compressed.graph.initializer}
    assert builders.rel_l2(builders.run_ort(model, data), builders.run_ort(compressed, data)) < 0.05


@pytest.mark.parametrize("step, listed", [({"op": "prune", "sparsity": 0.5}, True),
                                          ({"op": "lowrank", "rank_ratio": 0.5}, True),
                                          ({"op": "quantize", "weights": {"bits": 8}, "activations": {}}, False)])
def test_a_tied_tables_matmul_use_is_named_where_a_step_leaves_it(tmp_path, step, listed):
    # a GPT-2's output projection reads the token table through a Transpose its Gather keeps:
    # prune and lowrank left it float without a word; quantize takes it (as a table)
    path = tmp_path / "t.onnx"
    onnx.save_model(transposed_weight_mlp(), str(path))
    data = {"x": np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32),
            "ids": np.arange(32, dtype=np.int64) % 16}
    result = runner.run(path, parse_recipe({"steps": [{**step, "min_params": 512}]}), calibration=data,
                        workdir=tmp_path / "w", options=FAST)
    skipped = {row["name"]: row["reason"] for row in result.report["steps"][0]["skipped"]}
    assert ("fc2.weight" in skipped) == listed
    if listed:
        assert "through Transpose t2" in skipped["fc2.weight"] and "tied" in skipped["fc2.weight"]


def aliased_weight_mlp() -> onnx.ModelProto:
    """As PyTorch exports a parameter used twice (ALBERT's shared block) or two equal ones (zero
    biases): the second use reads Identity(first)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "block.weight"),
             numpy_helper.from_array(np.zeros(64, np.float32), "block.bias")]
    nodes = [helper.make_node("Gemm", ["x", "block.weight", "block.bias"], ["h1"], name="layer1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Identity", ["block.weight"], ["layer2.weight"], name="alias_w"),
             helper.make_node("Identity", ["block.bias"], ["layer2.bias"], name="alias_b"),
             helper.make_node("Gemm", ["r1", "layer2.weight", "layer2.bias"], ["y"], name="layer2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_reused_through_an_identity_is_quantized_at_every_use(tmp_path):
    # dynamic int8 left the layer behind the Identity float (and the float copy beside the int8 one)
    path = tmp_path / "a.onnx"
    model = aliased_weight_mlp()
    onnx.save_model(model, str(path))
    data = {"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)}
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8},
                                      "activations": {"calibration": "dynamic"}}]})
    result = runner.run(path, recipe, calibration=data, evaluation=data, workdir=tmp_path / "w", options=FAST)
    quantized = onnx.load(str(result.model_path))
    floats = [t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims
              and np.prod(t.dims) >= 1024]
    assert floats == [] and result.report["size_ratio"] > 3
    assert builders.rel_l2(builders.run_ort(model, data), builders.run_ort(quantized, data)) < 0.05


def fused_and_cast_weights() -> onnx.ModelProto:
    """What a file ONNX Runtime optimized holds (a com.microsoft FusedConv) and a float16
    checkpoint cast to float32 in the graph, beside one plain Conv."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "plain.weight"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "fused.weight"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float16), "half.weight")]
    nodes = [helper.make_node("Conv", ["x", "plain.weight"], ["a"], name="plain", pads=[1, 1, 1, 1]),
             helper.make_node("FusedConv", ["a", "fused.weight"], ["b"], name="fused", domain="com.microsoft",
                              activation="Relu", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["half.weight"], ["half32"], to=TensorProto.FLOAT, name="widen"),
             helper.make_node("Conv", ["b", "half32"], ["y"], name="half", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_weights_behind_a_fused_op_or_a_cast_are_named_not_passed_over(tmp_path):
    path = tmp_path / "f.onnx"
    onnx.save_model(fused_and_cast_weights(), str(path))
    result = runner.run(path, parse_recipe(INT8), workdir=tmp_path / "w", options=FAST)
    skipped = {row["name"]: row["reason"] for row in result.report["steps"][0]["skipped"]}
    assert "com.microsoft::FusedConv fused" in skipped["fused.weight"]
    assert "stored float16 and read through Cast widen" in skipped["half.weight"]
    assert {row["name"] for row in result.report["layers"]} == {"plain.weight"}


def _dequantized_zeros(path: Path) -> tuple[int, int]:
    """(values, zeros) of every weight the file dequantizes, as ONNX Runtime computes them."""
    from onnx import helper
    model = onnx.load(str(path))
    dq = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    probe = helper.make_graph([n for n in model.graph.node if n.op_type == "DequantizeLinear"], "dq", [],
                              [helper.make_empty_tensor_value_info(name) for name in dq], model.graph.initializer)
    values = builders.run_ort(helper.make_model(probe, opset_imports=model.opset_import), {})
    return sum(v.size for v in values), sum(int(np.count_nonzero(v == 0)) for v in values)


@pytest.mark.parametrize("weights", [{"bits": 4, "granularity": "tensor", "symmetric": False},
                                     {"bits": 2, "granularity": "block", "block_size": 32}])
def test_zeros_of_quantized_weights_are_counted_where_they_are(mlp_path, tmp_path, weights):
    # an asymmetric grid's zero is its zero point, not code 0; and a 2-bit grid zeroes a share of
    # every layer, which layers[].sparsity said was 0
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": weights, "format": "qdq"}]})
    report = runner.run(mlp_path, recipe, workdir=tmp_path / "w", options=FAST).report
    values, zeros = _dequantized_zeros(tmp_path / "w" / "model.onnx")
    assert zeros > 0.05 * values
    # every other tensor (biases, scales, a zero point of 8) holds no zero here
    assert report["compressed"]["params"] - report["compressed"]["nonzero_params"] == zeros
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["W1"]["sparsity"] > 0.05 and layers["W2"]["sparsity"] > 0.05


def test_clustered_weights_count_as_the_weights_they_index(mlp_path, tmp_path):
    # the packed index words were counted as params (26122 -> 3566)
    report = runner.run(mlp_path, parse_recipe({"steps": [{"op": "cluster", "bits": 4}]}), workdir=tmp_path / "w",
                        options=FAST).report
    # + the two codebooks and the decoding's shift and shape constants
    assert 0 <= report["compressed"]["params"] - report["original"]["params"] <= 64
    assert report["compressed"]["nonzero_params"] <= report["compressed"]["params"]


@pytest.mark.parametrize("first, bits", [({"op": "fp16"}, 4), ({"op": "lowrank", "rank_ratio": 0.5}, 4)])
def test_one_layer_row_per_weight_after_a_step_that_renames_it(mlp_path, tmp_path, first, bits):
    # fp16 stores W1 as W1_fp16, lowrank as W1_lowrank_a / _b: the quantize after them added rows under
    # those names (params null) while W1's row kept bits 16 / 32
    steps = [first, {"op": "quantize", "weights": {"bits": 4, "granularity": "block"}, "min_params": 512}]
    report = runner.run(mlp_path, parse_recipe({"steps": steps}), workdir=tmp_path / "w", options=FAST).report
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == {"W1", "W2"}
    assert rows["W1"]["bits"] == bits and rows["W1"]["params"] == 128 * 256


def test_a_step_matching_no_weight_is_refused_with_its_path(mlp_path, tmp_path):
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "include": ["nothing*"]}]})
    with pytest.raises(RecipeError) as info:
        runner.run(mlp_path, recipe, workdir=tmp_path)
    assert info.value.errors[0]["loc"] == ["steps", 0, "include"]
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "min_params": 10**9}]})
    with pytest.raises(RecipeError) as info:
        runner.run(mlp_path, recipe, workdir=tmp_path)
    assert info.value.errors[0]["loc"] == ["steps", 0, "min_params"]


def test_a_refusal_only_an_earlier_step_reveals_carries_its_step_path(mlp_path, tmp_path):
    # channel pruning takes W2 (256 x 16) under min_params; the check up front saw it whole
    recipe = parse_recipe({"steps": [{"op": "prune", "structure": "channel", "sparsity": 0.9, "include": ["W1"]},
                                     {"op": "quantize", "weights": {"bits": 8}, "include": ["W2"],
                                      "activations": {"calibration": "dynamic"}}]})
    with pytest.raises(RecipeError) as info:
        runner.run(mlp_path, recipe, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"][:2] == ["steps", 1]
    assert str(info.value).startswith("invalid recipe: steps.1.")
    assert not (tmp_path / "w" / "model.onnx").exists()


def test_a_step_matching_no_weight_says_what_it_looked_for(mlp_path, tmp_path):
    recipe = parse_recipe({"steps": [{"op": "prune", "sparsity": 0.5, "min_params": 10**6}]})
    with pytest.raises(RecipeError) as info:
        runner.run(mlp_path, recipe, workdir=tmp_path)
    assert info.value.errors[0]["loc"] == ["steps", 0, "min_params"]
    assert "no MatMul / Gemm / Conv / ConvTranspose weight of 1000000 or more elements" in info.value.errors[0]["msg"]


@pytest.mark.parametrize("calibration", ["percentile", "dynamic"])
def test_int8_activations_on_a_float16_model_are_refused_up_front(tmp_path, calibration):
    path = tmp_path / "half.onnx"
    onnx.save(builders.float16_mlp(), path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8},
                                      "activations": {"calibration": calibration}}]})
    calibration_data = {"x": np.random.default_rng(0).standard_normal((8, 128)).astype(np.float16)}
    with pytest.raises(RecipeError) as info:
        runner.run(path, recipe, calibration=calibration_data, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == ["steps", 0, "activations"]
    assert "float16" in info.value.errors[0]["msg"]


def test_int8_activations_on_a_float16_recurrent_cell_are_refused_up_front(tmp_path):
    # only the GRU's W / R pass min_params: the check looked at Conv / MatMul / Gemm alone, and the run
    # then failed in ONNX Runtime ("W has inconsistent type"), exit 1 with a traceback
    path = tmp_path / "gru16.onnx"
    onnx.save(_gru_model(np.float16, constants=False), path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {}}]})
    calibration_data = {"x": np.random.default_rng(0).standard_normal((8, 5, 32)).astype(np.float16)}
    with pytest.raises(RecipeError) as info:
        runner.run(path, recipe, calibration=calibration_data, workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == ["steps", 0, "activations"]
    assert "float16 (W and 1 more)" in info.value.errors[0]["msg"]


@pytest.mark.parametrize("step", [{"op": "prune", "sparsity": 0.5}, {"op": "prune", "sparsity": 0.25, "structure": "channel"},
                                  {"op": "lowrank", "rank_ratio": 0.5}, {"op": "cluster", "bits": 4}])
def test_weights_in_constant_nodes_are_pruned_factorized_and_clustered(tmp_path, step):
    # converters (paddle2onnx, tf2onnx) write weights as Constant nodes: these steps refused such a
    # model as having no weight at all, while quantize lifted them
    path = tmp_path / "constants.onnx"
    onnx.save(builders.mlp(constants=True), path)
    result = runner.run(path, parse_recipe({"steps": [step]}), workdir=tmp_path / "w", options=FAST)
    assert {row["name"] for row in result.report["layers"]} >= {"W1"}
    assert result.report["fidelity"]["rel_l2"] < 1.0


@pytest.mark.parametrize("ir_version, opset", [(8, 17), (3, 8)])
@pytest.mark.parametrize("step", [{"op": "fp16"}, {"op": "lowrank", "rank_ratio": 0.5},
                                  {"op": "quantize", "weights": {"bits": 8}, "activations": {}},
                                  {"op": "cluster", "bits": 4}])
def test_weights_listed_as_graph_inputs_do_not_become_inputs_without_a_value(tmp_path, step, ir_version, opset):
    # PyTorch's keep_initializers_as_inputs=True (IR 8), and IR 3, where it was the rule: a weight a step
    # replaced left its name among the inputs, a required input with no value (fp16 and lowrank exit 1;
    # on IR 3 every quantize and cluster failed the checker)
    model = builders.mlp(opset=opset)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    model.ir_version = ir_version
    path = tmp_path / "weights_as_inputs.onnx"
    onnx.save(model, path)
    data = {"x": np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32)}
    result = runner.run(path, parse_recipe({"steps": [step]}), calibration=data, workdir=tmp_path / "w", options=FAST)
    out = onnx.load(result.model_path)
    assert [i.name for i in out.graph.input] == ["x"] and out.ir_version >= 4
    assert result.report["fidelity"]["rel_l2"] < 0.5
    feeds = {"x": data["x"][:4]}
    assert builders.run_ort(out, feeds)[0].shape == builders.run_ort(model, feeds)[0].shape


@pytest.mark.parametrize("step", [{"op": "prune", "sparsity": 0.5}, {"op": "prune", "sparsity": 0.5, "method": "sparsegpt"},
                                  {"op": "cluster", "bits": 4}])
def test_a_weight_also_read_as_data_is_left_alone_by_prune_and_cluster(tmp_path, step):
    # W feeds a MatMul and a ReduceSum whose result is a model output: pruning / clustering W changed
    # that output (SparseGPT: rel_l2 0.62) with exit 0 and nothing said
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
             helper.make_node("ReduceSum", ["W"], ["colsum"], name="colsum_of_W", keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64]),
                           helper.make_tensor_value_info("colsum", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "data_reader.onnx"
    onnx.save(model, path)
    data = {"x": rng.standard_normal((32, 64)).astype(np.float32)}
    result = runner.run(path, parse_recipe({"steps": [step]}), calibration=data, workdir=tmp_path / "w", options=FAST)
    skipped = result.report["steps"][0]["skipped"]
    assert [row["name"] for row in skipped] == ["W"] and "ReduceSum colsum_of_W" in skipped[0]["reason"]
    out = onnx.load(result.model_path)
    feeds = {"x": data["x"][:4]}
    assert np.allclose(builders.run_ort(out, feeds)[1], builders.run_ort(model, feeds)[1])


def test_layerwise_distillation_refits_a_conv_that_bias_correction_gave_a_bias(tmp_path):
    # static int8's bias correction adds a bias to a Conv that had none; distill then refused the
    # whole recipe ("has no layer to refit: the layer's bias differs")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) * 0.3).astype(np.float32), "c1"),
             numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32), "c2")]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 8, 8])], inits)
    path = tmp_path / "conv_no_bias.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = {"x": rng.standard_normal((32, 4, 8, 8)).astype(np.float32)}
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {}, "min_params": 0},
                                     {"op": "distill", "method": "layerwise", "min_params": 0}]})
    result = runner.run(path, recipe, calibration=data, workdir=tmp_path / "w", options=FAST)
    assert result.report["steps"][0]["bias_corrected"]
    assert not any("bias" in row["reason"] for row in result.report["steps"][1].get("skipped", []))
    assert result.report["fidelity"]["rel_l2"] < 0.05


def test_a_step_that_does_not_reach_into_bodies_names_the_weights_there(tmp_path):
    # every weight inside an If body: "no weight of 1024 or more elements in the model" read as if
    # the model had none
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "Wb"], ["t"], name="body_fc")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b", 64])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", 64])])
    g = helper.make_graph([helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then, else_branch=other)],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
                          [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "Wb"),
                           numpy_helper.from_array(np.array(True), "flag")])
    path = tmp_path / "body_only.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(RecipeError) as info:
        runner.run(path, parse_recipe({"steps": [{"op": "prune", "sparsity": 0.5}]}), workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"] == ["steps", 0, "min_params"]
    assert "1 inside If / Loop / Scan bodies (Wb first), which prune does not reach" in info.value.errors[0]["msg"]
    # quantize reaches the body's weight; layerwise distillation after it said "the original has no such layer"
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4}},
                                     {"op": "distill", "method": "layerwise"}]})
    data = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    with pytest.raises(RecipeError) as info:
        runner.run(path, recipe, calibration=data, workdir=tmp_path / "w2", options=FAST)
    assert "Wb: inside an If / Loop / Scan body, which layerwise refits do not reach" in info.value.errors[0]["msg"]


def _gru_model(dtype, constants: bool, hidden: int = 32, width: int = 32) -> onnx.ModelProto:
    """x[batch, 5, width] -> Transpose -> GRU(W, R) -> y; ``constants``: W and R in Constant nodes."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(dtype), name)
               for name, shape in (("W", (1, 3 * hidden, width)), ("R", (1, 3 * hidden, hidden)))]
    nodes = [helper.make_node("Transpose", ["x"], ["time_major"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["time_major", "W", "R"], ["y"], name="gru", hidden_size=hidden)]
    if constants:
        nodes = [helper.make_node("Constant", [], [w.name], value=w) for w in weights] + nodes
        weights = []
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["batch", 5, width])],
                          [helper.make_tensor_value_info("y", elem, [5, 1, "batch", hidden])], weights)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("calibration", ["percentile", "dynamic"])
def test_recurrent_weights_in_constant_nodes_are_lifted_and_stored_int8(tmp_path, calibration):
    # exporters that write every weight as a Constant node: the main graph's GRU / LSTM W and R were
    # not lifted, so a GRU-only model was refused as weightless and a CRNN's LSTM silently left float
    from core.onnx_guard import validate

    path = tmp_path / "gru_constants.onnx"
    onnx.save(_gru_model(np.float32, constants=True), path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8},
                                      "activations": {"calibration": calibration}}]})
    data = {"x": np.random.default_rng(1).standard_normal((8, 5, 32)).astype(np.float32)}
    result = runner.run(path, recipe, calibration=data, workdir=tmp_path / "w", options=FAST)
    assert {row["name"] for row in result.report["layers"]} == {"W", "R"}
    assert result.report["size_ratio"] > 3
    assert result.report["fidelity"]["rel_l2"] < 0.05
    assert validate(path).params == 2 * 3 * 32 * 32     # the upload's count sees them too


def test_dynamic_int8_takes_a_gemm_whose_bias_is_a_constant_node(tmp_path):
    # tf2onnx / paddle2onnx write Gemm's C as a Constant node: only the weight was lifted, and every
    # such Gemm was refused with a message listing conditions it met
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    arrays = {"W": rng.standard_normal((64, 96)).astype(np.float32) * 0.1,
              "C": rng.standard_normal(96).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
             for name, value in arrays.items()]
    nodes.append(helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 96])])
    path = tmp_path / "gemm_constants.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}]})
    result = runner.run(path, recipe, workdir=tmp_path / "w", options=FAST)
    assert [row["name"] for row in result.report["layers"]] == ["W"]
    assert result.report["fidelity"]["rel_l2"] < 0.05


@pytest.mark.parametrize("decode", ["DequantizeLinear", "Cast"])     # Cast then scale: our int4 Conv's form
@pytest.mark.parametrize("step", [{"op": "prune", "sparsity": 0.5}, {"op": "quantize", "weights": {"bits": 8}},
                                  {"op": "fp16"}])
def test_a_model_quantized_before_it_came_is_refused_with_that_reason(tmp_path, step, decode):
    rng = np.random.default_rng(6)
    weights = rng.integers(-127, 128, (64, 64)).astype(np.int8)
    if decode == "DequantizeLinear":
        nodes = [onnx.helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"])]
    else:
        nodes = [onnx.helper.make_node("Cast", ["Wq"], ["Wf"], to=onnx.TensorProto.FLOAT),
                 onnx.helper.make_node("Mul", ["Wf", "scale"], ["W"])]
    nodes.append(onnx.helper.make_node("MatMul", ["x", "W"], ["y"]))
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 64])],
                               [onnx.numpy_helper.from_array(weights, "Wq"),
                                onnx.numpy_helper.from_array(np.array(0.01, np.float32), "scale")])
    path = tmp_path / "qdq.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    with pytest.raises(RecipeError) as info:
        runner.run(path, parse_recipe({"steps": [step]}), workdir=tmp_path / "w")
    assert info.value.errors[0]["loc"][:2] == ["steps", 0]
    assert "integers already (1 behind quantized ops, Wq first)" in info.value.errors[0]["msg"]


def test_layerwise_distillation_refits_a_converters_constant_node_weights(tmp_path):
    # the teacher (the original) kept its weights in Constant nodes: every layer was refused as
    # "the weight is not a constant"
    path = tmp_path / "constants.onnx"
    onnx.save(builders.mlp(constants=True), path)
    calibration = {"x": np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32)}
    recipe = parse_recipe({"steps": [{"op": "prune", "sparsity": 0.6}, {"op": "distill", "method": "layerwise"}]})
    report = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "w", options=FAST).report
    distill = report["steps"][1]
    assert distill["op"] == "distill" and distill["method"] == "layerwise"
    assert report["fidelity"]["rel_l2"] < 0.5


def test_unknown_target_and_unloadable_model(mlp_path, tmp_path):
    with pytest.raises(InvalidInput) as info:
        runner.run(mlp_path, parse_recipe(INT8), target="tpu", workdir=tmp_path)
    assert info.value.errors[0]["loc"] == ["target"]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(InvalidModel):
        runner.run(junk, parse_recipe(INT8), workdir=tmp_path / "w")


def test_cancelled_between_steps(mlp_path, tmp_path):
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "include": ["W1"]},
                                     {"op": "quantize", "weights": {"bits": 8}, "include": ["W2"]}]})
    calls = {"n": 0}

    def cancelled() -> bool:      # checked before step 1 (False), then before step 2 (True)
        calls["n"] += 1
        return calls["n"] >= 2

    stages = []
    with pytest.raises(StepCancelled):
        runner.run(mlp_path, recipe, workdir=tmp_path / "w", cancelled=cancelled,
                   progress=lambda f, s: stages.append(s))
    assert "step 1/2: quantize" in stages and "step 2/2: quantize" not in stages
    assert not (tmp_path / "w" / "model.onnx").exists()


def test_two_steps_progress_and_report(mlp_path, tmp_path):
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "include": ["W1"]},
                                     {"op": "quantize", "weights": {"bits": 8}, "include": ["W2"]}]})
    stages = []
    report = runner.run(mlp_path, recipe, workdir=tmp_path / "w", options=FAST,
                        progress=lambda f, s: stages.append((round(f, 3), s))).report
    assert (0.0, "step 1/2: quantize") in stages and (0.4, "step 2/2: quantize") in stages
    assert len(report["steps"]) == 2 and {row["name"] for row in report["layers"]} == {"W1", "W2"}


def test_model_with_external_data(tmp_path):
    model = builders.mlp()
    source = tmp_path / "src"
    source.mkdir()
    builders.save_external(model, source / "mlp.onnx")
    assert (source / "mlp.onnx.data").exists() and (source / "mlp.onnx").stat().st_size < 2000
    result = runner.run(source / "mlp.onnx", parse_recipe(INT8), workdir=tmp_path / "w", options=FAST)
    report = result.report
    # the original's bytes count its external data file
    assert report["original"]["bytes"] > 140_000 and report["size_ratio"] >= 3.5
    assert report["original"]["params"] == 128 * 256 + 256 + 256 * 16 + 16
    assert all(row["output_rel_l2"] is not None for row in report["layers"])
    assert report["fidelity"]["rel_l2"] < 0.03


def test_output_past_the_protobuf_limit_goes_to_external_data(tmp_path, monkeypatch):
    """Models over 2 GB are written with external data; the threshold is lowered here to run that
    path on a small model (the file check then runs on the path, not in memory)."""
    from worker.pipeline import graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(), str(path))
    result = runner.run(path, parse_recipe(INT8), workdir=tmp_path / "w", options=FAST)
    assert (tmp_path / "w" / "model.onnx.data").exists()
    onnx.checker.check_model(str(result.model_path), full_check=True)
    assert result.report["compressed"]["bytes"] == (tmp_path / "w" / "model.onnx").stat().st_size + \
        (tmp_path / "w" / "model.onnx.data").stat().st_size
    assert result.report["fidelity"]["rel_l2"] < 0.03


def test_scalar_and_bool_inputs_with_generated_data(tmp_path):
    """A model with a scalar bool input (an If's condition): generated fidelity data feeds it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                          [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")])
    path = tmp_path / "if.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = runner.run(path, parse_recipe(INT8), workdir=tmp_path / "w", options=FAST).report
    assert report["fidelity_data"] == "generated" and report["fidelity"]["rel_l2"] < 0.03


def test_only_the_originals_value_info_is_kept(tmp_path):
    # int4 raises the opset to 21, and the upgrade annotates every intermediate tensor's shape: with
    # shapes known ONNX Runtime fuses what it leaves alone in the original (and may run it slower)
    model = builders.mlp(inputs=64, hidden=64, classes=4)
    hidden = next(node.output[0] for node in model.graph.node if node.op_type != "MatMul")
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path))
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "block",
                                                                    "block_size": 32}, "min_params": 0}]})
    result = runner.run(path, recipe, workdir=tmp_path / "w", options=FAST)
    compressed = onnx.load(str(result.model_path))
    assert max(o.version for o in compressed.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert [value.name for value in compressed.graph.value_info] == [hidden]


def _weight_first_model(tmp_path: Path, with_readable: bool) -> Path:
    """y = relu(W1 @ x) [@ W2]: W1 (the MatMul's first operand) is a layout no weight step reads."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W1")]
    nodes = [helper.make_node("MatMul", ["W1", "x"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["y0"], name="relu")]
    out = "y0"
    if with_readable:
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "W2"))
        nodes.append(helper.make_node("MatMul", ["y0", "W2"], ["y"], name="second"))
        out = "y"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 16])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 64, 64 if with_readable else 16])],
                          inits)
    path = tmp_path / f"weight_first_{with_readable}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_weights_in_a_layout_no_step_reads_are_named(tmp_path: Path):
    """W @ x weights were skipped silently (70 % of a model's parameters) and, as the only weight,
    refused as if the model had none of min_params' size."""
    alone = _weight_first_model(tmp_path, with_readable=False)
    with pytest.raises(RecipeError) as info:
        runner.run(alone, parse_recipe(INT8), workdir=tmp_path / "a")
    assert info.value.errors[0]["loc"] == ["steps", 0, "min_params"]
    assert "W1 (2048 elements: the first operand of MatMul first (W @ x)" in info.value.errors[0]["msg"]
    both = _weight_first_model(tmp_path, with_readable=True)
    report = runner.run(both, parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "min_params": 0}]}),
                        workdir=tmp_path / "b", options=FAST).report
    skipped = {entry["name"]: entry["reason"] for entry in report["steps"][0]["skipped"]}
    assert "W1" in skipped and "a layout no weight step reads" in skipped["W1"]
    assert "W2" in {row["name"] for row in report["layers"]}


def test_fidelity_per_output_separates_an_index_output(tmp_path: Path):
    """The contract's fidelity concatenates every output; per output, an int64 argmax shows its own
    agreement and a float output its own rel_l2."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc"),
             helper.make_node("ArgMax", ["logits"], ["label"], name="pick", axis=1, keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10]),
                           helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])], inits)
    path = tmp_path / "two_outputs.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    evaluation = {"x": rng.standard_normal((40, 32)).astype(np.float32)}
    report = runner.run(path, parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "min_params": 0}]}),
                        evaluation=evaluation, workdir=tmp_path / "w", options=FAST).report
    rows = {row["name"]: row for row in report["fidelity_outputs"]}
    assert list(rows) == ["logits", "label"] and "agreement" not in rows["logits"]
    original = builders.run_ort(onnx.load(path), evaluation)
    compressed = builders.run_ort(onnx.load(tmp_path / "w" / "model.onnx"), evaluation)
    assert rows["label"]["agreement"] == pytest.approx(float(np.mean(original[1] == compressed[1])))
    want = np.linalg.norm(compressed[0] - original[0]) / np.linalg.norm(original[0])
    assert rows["logits"]["rel_l2"] == pytest.approx(float(want), rel=1e-4)


def _mlp_with(tmp_path: Path, name: str, change) -> Path:
    model = builders.mlp()
    change(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def test_nodes_listed_out_of_order_are_sorted_at_load(tmp_path: Path):
    """ONNX Runtime runs a file whose nodes are out of order; GPTQ failed on it ('not alive at node 0')."""
    path = _mlp_with(tmp_path, "reversed", lambda m: m.graph.node.reverse())
    calibration = builders.random_inputs(builders.mlp(), count=16)
    recipe = parse_recipe({"steps": [{"op": "quantize", "method": "gptq", "min_params": 0,
                                      "weights": {"bits": 4, "granularity": "block", "block_size": 32}}]})
    result = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "w", options=FAST)
    onnx.checker.check_model(onnx.load(result.model_path), full_check=True)


def test_a_sequence_output_is_refused_up_front_naming_it(tmp_path: Path):
    from onnx import TensorProto, helper

    def add_sequence(model):
        model.graph.node.append(helper.make_node("SequenceConstruct", [model.graph.output[0].name], ["seq"]))
        model.graph.output.append(helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None))
    path = _mlp_with(tmp_path, "sequence", add_sequence)
    with pytest.raises(InvalidModel) as info:
        runner.run(path, parse_recipe(INT8), workdir=tmp_path / "w", options=FAST)
    assert info.value.errors[0]["loc"] == ["model", "outputs", "seq"] and "a sequence" in str(info.value)


def test_an_initializer_given_out_as_an_output_survives_dynamic_int8(tmp_path: Path):
    from onnx import TensorProto, helper, numpy_helper

    def give_out_a_table(model):
        model.graph.initializer.append(numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "table"))
        model.graph.output.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [2, 3]))
    path = _mlp_with(tmp_path, "table_out", give_out_a_table)
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}}]})
    result = runner.run(path, recipe, workdir=tmp_path / "w", options=FAST)
    written = onnx.load(result.model_path)
    assert "table" in {t.name for t in written.graph.initializer}


def test_an_output_whose_shape_depends_on_the_data_leaves_fidelity_and_says_so(tmp_path: Path):
    """A NonMaxSuppression-style output (rows above a threshold) changes its row count under
    quantization: fidelity compared it element by element and failed (exit 1)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 256)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0.0, np.float32), "threshold")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["scores"], name="fc"),
             helper.make_node("Greater", ["scores", "threshold"], ["above"], name="gt"),
             helper.make_node("NonZero", ["above"], ["where"], name="nz")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 256]),
                           helper.make_tensor_value_info("where", TensorProto.INT64, [2, "k"])], inits)
    path = tmp_path / "nms_like.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    evaluation = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 4, "granularity": "channel"}, "min_params": 0}]})
    report = runner.run(path, recipe, evaluation=evaluation, workdir=tmp_path / "w", options=FAST).report
    rows = {row["name"]: row for row in report["fidelity_outputs"]}
    assert rows["where"]["shape_mismatches"] >= 1 and rows["where"]["rel_l2"] is None
    assert report["fidelity"]["rel_l2"] == pytest.approx(rows["scores"]["rel_l2"])


@pytest.mark.parametrize("first", [{"op": "quantize", "weights": {"bits": 8}, "activations": {}},
                                   {"op": "cluster", "bits": 4}])
def test_a_second_compression_of_the_same_weights_is_refused_naming_the_first(mlp_path, tmp_path, first):
    """int4 after static int8 wrote 'quantized: 0' and exit 0; static after cluster blamed min_params."""
    calibration = builders.random_inputs(builders.mlp(), count=16)
    for second in ({"op": "quantize", "weights": {"bits": 4}}, {"op": "quantize", "weights": {"bits": 8}, "activations": {}}):
        with pytest.raises(RecipeError) as info:
            runner.run(mlp_path, parse_recipe({"steps": [first, second]}), calibration=calibration,
                       workdir=tmp_path / "w", options=FAST)
        assert info.value.errors[0]["loc"][:2] == ["steps", 1]
        assert f"steps.0 ({first['op']}) already stores the weights" in info.value.errors[0]["msg"]
