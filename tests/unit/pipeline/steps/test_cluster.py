"""cluster: k-means codebooks with bit-packed indices that ONNX Runtime decodes, zeros kept."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import RecipeError
from core.recipe import parse_recipe
from worker.pipeline.step import StepContext
from worker.pipeline.steps import cluster, prune

from .structure_models import mlp_fp16, assert_valid_same_io, attention, cnn, inputs_for, mlp, rel_l2, run_model


def _params(op="cluster", **fields):
    return parse_recipe({"steps": [{"op": op, **fields}]}).steps[0]


def _linear(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W: fed the identity, the model outputs W itself, so decoding is observable."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_onnxruntime_decodes_exactly_the_codebook_values(bits):
    model = _linear(40, 37)                       # 1480 weights: not a multiple of any word
    ctx = StepContext(original=model)
    result = cluster.run(model, _params(bits=bits), ctx)
    feeds = {"x": np.eye(40, dtype=np.float32)}
    decoded = assert_valid_same_io(result.model, model, feeds)[0]
    codebook = ctx.layers["w"].codebook
    assert codebook.size <= 2 ** bits and np.all(np.diff(codebook) > 0)
    assert set(np.unique(decoded)) <= set(codebook.tolist())
    w = numpy_helper.to_array(model.graph.initializer[0])
    # every weight went to its nearest centroid (the k-means assignment step)
    nearest = codebook[np.abs(w[..., None] - codebook).argmin(axis=-1)]
    np.testing.assert_array_equal(decoded, nearest)
    assert ctx.layers["w"].bits == bits


@pytest.mark.parametrize("bits,ratio", [(4, 7.5), (8, 3.9), (2, 14.0)])
def test_file_shrinks_about_32_over_bits(bits, ratio):
    model = _linear(512, 512)
    result = cluster.run(model, _params(bits=bits), StepContext(original=model))
    assert model.ByteSize() / result.model.ByteSize() >= ratio
    assert result.metrics["bytes_before"] / result.metrics["bytes_after"] >= ratio


def test_clustering_after_pruning_keeps_zeros_zero():
    model = mlp()
    ctx = StepContext(original=model)
    pruned = prune.run(model, _params("prune", sparsity=0.5, min_params=0), ctx)
    zeros = {n: ctx.layers[n].mask.size - int(ctx.layers[n].mask.sum()) for n in ("w1", "w2", "w3")}
    result = cluster.run(pruned.model, _params(bits=3, min_params=0), ctx)
    feeds = inputs_for(model)
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert rel_l2(got, run_model(pruned.model, feeds)[0]) < 0.25
    for name in ("w1", "w2", "w3"):
        record = ctx.layers[name]
        assert 0.0 in record.codebook.tolist() and record.codebook.size <= 8
        assert record.sparsity == pytest.approx(zeros[name] / record.mask.size)
    probe = _linear(64, 64)
    ctx = StepContext(original=probe)
    pruned = prune.run(probe, _params("prune", sparsity=0.7, min_params=0), ctx)
    decoded = run_model(cluster.run(pruned.model, _params(bits=2, min_params=0), ctx).model,
                        {"x": np.eye(64, dtype=np.float32)})[0]
    mask = ctx.layers["w"].mask
    assert np.all(decoded[~mask] == 0) and np.count_nonzero(decoded[mask]) == mask.sum()


def test_cnn_and_attention_run_clustered():
    for build in (cnn, attention):
        model = build()
        ctx = StepContext(original=model)
        result = cluster.run(model, _params(bits=6, min_params=0), ctx)
        feeds = inputs_for(model)
        got = assert_valid_same_io(result.model, model, feeds)[0]
        assert rel_l2(got, run_model(model, feeds)[0]) < 0.1
        assert all(layer["sqnr_db"] > 25 for layer in result.metrics["layers"])


def test_pack_labels_layout():
    labels = np.array([1, 2, 3, 0, 1], dtype=np.uint8)
    words = cluster.pack_labels(labels, 2)          # 16 labels per word, label j at bit 2j
    assert words.shape == (1, 1) and int(words[0, 0]) == 1 | 2 << 2 | 3 << 4 | 0 << 6 | 1 << 8


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits_refused_with_field_path(bits):
    with pytest.raises(RecipeError) as info:
        _params(bits=bits)
    assert info.value.errors[0]["loc"] == ["steps", 0, "bits"]


def test_float16_weights_keep_their_dtype():
    model = mlp_fp16()
    result = cluster.run(model, parse_recipe({"steps": [{"op": "cluster", **{"bits": 4, "min_params": 0}}]}).steps[0], StepContext(original=model))
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)}
    got = assert_valid_same_io(result.model, model, feeds)[0]
    assert got.dtype == np.float16
    assert {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)} == {10}


def test_structural_steps_compose_through_the_runner(tmp_path):
    """cleanup -> channel prune -> lowrank -> cluster as one recipe: the report (plain JSON) shows
    per-layer sparsity and rank, and the file shrinks."""
    import json

    from worker.pipeline.runner import run as run_pipeline

    model = cnn()
    path = tmp_path / "cnn.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    recipe = parse_recipe({"steps": [
        {"op": "cleanup"},
        {"op": "prune", "structure": "channel", "sparsity": 0.25, "min_params": 0},
        {"op": "lowrank", "rank_ratio": 0.5, "conv": "channel", "include": ["conv4*"], "min_params": 0},
        {"op": "cluster", "bits": 4, "min_params": 0}]})
    result = run_pipeline(path, recipe, calibration=calibration, workdir=tmp_path / "out",
                          options={"latency_runs": 3, "latency_budget_s": 1, "fidelity_samples": 32})
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["size_ratio"] > 3
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["conv4_w"]["rank"] is not None and layers["conv4_w"]["rank"] > 0
    assert [step["op"] for step in report["steps"]] == ["cleanup", "prune", "lowrank", "cluster"]
    onnx.checker.check_model(onnx.load(str(result.model_path)), full_check=True)
