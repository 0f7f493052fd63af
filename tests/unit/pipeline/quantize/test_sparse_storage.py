"""Sparse storage of pruned integer weights (bitmask + values, decoded by ONNX Runtime's constant
folding): the decoded weights are the dense ones bit for bit, outputs are identical, the file gets
smaller, and params / nonzero_params count what the dense form counts."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from core.recipe import parse_recipe
from tests.unit.pipeline import builders
from worker.pipeline import metrics, runner
from worker.pipeline.quantize import sparse_form, sparse_storage
from worker.pipeline.step import StepContext
from worker.pipeline.steps import prune, quantize

PRUNE = {"op": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "layer", "min_params": 0}
WEIGHT_ONLY = {"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"},
               "min_params": 0, "format": "qdq"}
STATIC = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}, "min_params": 0}
DYNAMIC = {"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "dynamic"}, "min_params": 0}


def _compress(model, steps, *, sparse: bool, calibration=None):
    """The recipe's steps run one after another, then the sparse storage, as the runner runs them;
    returns (model, ctx)."""
    ctx = StepContext(original=model, calibration=calibration)
    for step in parse_recipe({"steps": steps}).steps:
        module = {"prune": prune, "quantize": quantize}[step.op]
        model = module.run(model, step, ctx).model
    if sparse:
        sparse_storage.store_pipeline_output(model, ctx.layers)
    onnx.checker.check_model(model, full_check=True)
    return model, ctx


def _both(model, steps, calibration=None):
    dense, _ = _compress(model, steps, sparse=False, calibration=calibration)
    stored, ctx = _compress(model, steps, sparse=True, calibration=calibration)
    return dense, stored, ctx


_io = builders.io_of


def _folded_initializers(model, path) -> dict[str, np.ndarray]:
    """The initializers ONNX Runtime holds after its graph optimizations (constant folding)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(path))
    assert not any(node.op_type in ("BitShift", "CumSum") for node in folded.graph.node), "decoding not folded"
    return {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}


def test_pack_unpack_round_trip_keeps_every_value_and_the_fill():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(37, 29)).astype(np.int8)
    q[rng.random(q.shape) < 0.6] = 0
    packed = sparse_storage.pack(q)
    assert packed.values[0] == 0 and packed.values.size - 1 == np.count_nonzero(q)
    assert packed.mask.shape == (-(-q.size // 8), 1)
    assert np.array_equal(sparse_form.unpack(packed.mask, packed.values, q.size, q.shape), q)
    # uint8 weights whose pruned entries sit at the zero point 128: the fill is 128, not 0
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    packed = sparse_storage.pack(u)
    assert packed.values[0] == 128
    restored = sparse_form.unpack(packed.mask, packed.values, u.size, u.shape)
    assert restored.dtype == np.uint8 and np.array_equal(restored, u)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), rows=st.integers(1, 40), cols=st.integers(1, 40),
       sparsity=st.floats(0.0, 0.95), unsigned=st.booleans())
def test_closing_the_gap_is_undone_exactly_and_keeps_zeros_and_signs(seed, rows, cols, sparsity, unsigned):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 3.0, size=(1, cols))          # channels of different widths
    w = rng.standard_normal((rows, cols)) * scale
    w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0   # magnitude-pruned: a gap around 0
    q = np.clip(np.rint(w / (np.abs(w).max(axis=0, keepdims=True) + 1e-12) * 127), -127, 127).astype(np.int8)
    center = 128 if unsigned else 0
    stored = (q.astype(np.int16) + 128).astype(np.uint8) if unsigned else q     # int8_storage' uint8 form
    closed = sparse_storage.close_gap(stored)
    if closed is None:
        return
    shifted, offsets = closed
    assert shifted.dtype == stored.dtype and offsets.dtype == np.int8 and offsets.min() >= 0
    side = np.sign(shifted.astype(np.int16) - center)
    assert np.array_equal(side, np.sign(q)) and np.array_equal(side == 0, q == 0)
    assert np.array_equal(sparse_form.open_gap(shifted, offsets), stored)


def test_a_gap_is_closed_only_where_it_pays():
    rng = np.random.default_rng(3)
    # values up to +-1 in every channel: nothing to close
    q = rng.integers(-127, 128, size=(256, 64)).astype(np.int8)
    q[rng.random(q.shape) < 0.5] = 0
    q[0] = 1
    q[1] = -1
    assert sparse_storage.close_gap(q) is None
    # each output channel (axis 1) misses a band of its own around 0: the axis found is 1
    t = rng.integers(10, 60, size=(1, 64))
    q = (np.sign(q) * np.maximum(np.abs(q.astype(np.int16)), t)).astype(np.int8)
    q[0], q[1] = t[0], -t[0]
    shifted, offsets = sparse_storage.close_gap(q)
    assert offsets.shape == (1, 64) and np.array_equal(offsets, t - 1)
    assert np.abs(shifted[shifted != 0]).min() == 1
    # the same grid stored uint8 (+ 128): the same offsets, the values shifted around 128
    shifted_u, offsets_u = sparse_storage.close_gap((q.astype(np.int16) + 128).astype(np.uint8))
    assert np.array_equal(offsets_u, offsets) and np.array_equal(shifted_u.astype(np.int16) - 128, shifted)
    assert sparse_storage.close_gap(q.astype(np.uint8)) is None       # fill 0 is not uint8's zero


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), rows=st.integers(1, 40), cols=st.integers(1, 40),
       threshold=st.integers(0, 100), unsigned=st.booleans())
def test_shifting_the_whole_tensor_is_undone_exactly(seed, rows, cols, threshold, unsigned):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, size=(rows, cols)).astype(np.int16)
    q[np.abs(q) <= threshold] = 0                  # one per-tensor threshold: one gap for all channels
    q[rng.random(q.shape) < 0.5] = 0
    center = 128 if unsigned else 0
    stored = (q + center).astype(np.uint8 if unsigned else np.int8)
    shifted = sparse_storage.shift_whole(stored)
    kept = q != 0
    if shifted is None:
        assert not kept.any() or np.abs(q[kept]).min() < 2 or sparse_storage.fill_value(stored) != center
        return
    values, offsets = shifted
    assert offsets.shape == (1, 1) and int(offsets[0, 0]) == np.abs(q[kept]).min() - 1
    wide = values.astype(np.int16) - center
    assert np.abs(wide[kept]).min() == 1 and np.array_equal(np.sign(wide), np.sign(q))
    assert np.array_equal(sparse_form.open_gap(values, offsets), stored)


def test_per_tensor_int8_pruned_weights_decode_exactly_with_one_offset(tmp_path, monkeypatch):
    # a per-tensor grid pruned per layer: no channel has a gap of its own, the whole tensor has one
    monkeypatch.setattr(sparse_storage, "WHOLE_FILE_WORK", 0)       # each tensor in its first form
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    per_tensor = {**WEIGHT_ONLY, "weights": {"bits": 8, "symmetric": True, "granularity": "tensor"}}
    dense, stored, ctx = _both(model, [PRUNE, per_tensor])
    found = sparse_form.find_sparse_weights(stored.graph)
    assert found and all(s.offsets is not None for s in found)
    assert ctx.layers["W1"].extra["storage"].endswith(", its gap around 0 closed")
    inits = {t.name: numpy_helper.to_array(t) for t in stored.graph.initializer}
    assert all(inits[s.offsets].size == 1 for s in found)
    folded = _folded_initializers(stored, tmp_path / "folded.onnx")
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    for s in found:
        assert np.array_equal(folded[s.weight], dense_w[s.weight])
    feeds = builders.random_inputs(model, count=16)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)


def test_the_whole_file_pass_keeps_each_tensor_in_its_smallest_measured_state():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, _ = _compress(model, [PRUNE, WEIGHT_ONLY], sparse=False)
    stored = onnx.ModelProto()
    stored.CopyFrom(dense)
    decisions = sparse_storage.store_sparse(stored)
    measured = [row for row in decisions.values() if "file_zstd_dense" in row]
    assert measured
    for row in measured:
        # a move away from the first state is made only for MIN_GAIN bytes (either way)
        dense_size, sparse_size = row["file_zstd_dense"], row["file_zstd_sparse"]
        if row["sparse"]:
            assert dense_size > sparse_size - sparse_storage.MIN_GAIN
        else:
            assert sparse_size > dense_size - sparse_storage.MIN_GAIN
    # and the file is no bigger after zstd than the dense one
    assert sparse_storage.zstd_size(stored.SerializeToString()) <= sparse_storage.zstd_size(dense.SerializeToString())


def _wide_conv() -> onnx.ModelProto:
    """x[batch, 64, 6, 6] -> Conv 3x3 (128 channels of different widths, as trained ones) -> Relu."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((128, 64, 3, 3)) * rng.uniform(0.2, 3.0, size=(128, 1, 1, 1))).astype(np.float32)
    nodes = [onnx.helper.make_node("Conv", ["x", "conv.W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = onnx.helper.make_graph(
        nodes, "wide_conv", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 128, 6, 6])],
        [numpy_helper.from_array(w, "conv.W")])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_pruned_conv_with_closed_gaps_decodes_bit_exact_and_counts_as_dense(tmp_path):
    model = _wide_conv()
    dense, stored, ctx = _both(model, [PRUNE, WEIGHT_ONLY])
    found = {s.weight: s for s in sparse_form.find_sparse_weights(stored.graph)}
    gapped = [name for name, s in found.items() if s.offsets is not None]
    assert gapped, "no weight of the pruned CNN had its gap closed"
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    folded = _folded_initializers(stored, tmp_path / "folded.onnx")
    assert not any(n.op_type == "Sign" for n in onnx.load(str(tmp_path / "folded.onnx")).graph.node)
    for name in found:
        assert np.array_equal(folded[name], dense_w[name])
        assert np.array_equal(numpy_helper.to_array(
            sparse_form.decoded_tensor(stored.graph, found[name], numpy_helper.to_array)), dense_w[name])
    feeds = builders.random_inputs(model, count=8)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)
    assert metrics.param_counts(stored) == metrics.param_counts(dense)
    assert any("gap" in (record.extra.get("storage") or "") for record in ctx.layers.values())


def test_pruned_int8_mlp_decodes_to_the_dense_weights_with_identical_outputs(tmp_path):
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, stored, ctx = _both(model, [PRUNE, WEIGHT_ONLY])
    found = sparse_form.find_sparse_weights(stored.graph)
    stored_sparse = {s.weight for s in found}
    assert "W1_quantized" in stored_sparse
    assert {t.name for t in stored.graph.initializer}.isdisjoint(stored_sparse)
    assert _io(stored) == _io(model)

    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    folded = _folded_initializers(stored, tmp_path / "folded.onnx")
    for name in stored_sparse:
        assert folded[name].dtype == np.int8
        assert np.array_equal(folded[name], dense_w[name])
    # the pruned half is still exactly zero after the round trip
    assert np.count_nonzero(folded["W1_quantized"] == 0) >= 0.5 * folded["W1_quantized"].size

    feeds = builders.random_inputs(model, count=32)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)

    assert stored.ByteSize() < 0.7 * dense.ByteSize()
    assert metrics.param_counts(stored) == metrics.param_counts(dense)
    assert metrics.macs(stored) == metrics.macs(dense)
    record = ctx.layers["W1"]
    assert record.bits == 8 and abs(record.sparsity - 0.5) < 0.01 and "bitmask" in record.extra["storage"]


def test_smaller_zstd_file_and_dense_weights_without_zeros_stay_dense(tmp_path):
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    paths = {}
    for label, m in (("dense", dense), ("stored", stored)):
        paths[label] = tmp_path / f"{label}.onnx"
        onnx.save_model(m, str(paths[label]))
    assert metrics.zstd_bytes(paths["stored"]) < metrics.zstd_bytes(paths["dense"])
    assert metrics.file_bytes(paths["stored"]) < metrics.file_bytes(paths["dense"])

    # quantized without pruning: hardly a zero among the int8 values, nothing to gain
    unpruned, _ = _compress(model, [WEIGHT_ONLY], sparse=True)
    assert sparse_form.find_sparse_weights(unpruned.graph) == []
    assert any(t.name == "W1_quantized" and t.data_type == onnx.TensorProto.INT8 for t in unpruned.graph.initializer)


@pytest.mark.parametrize("storage", ["int8", "uint8"])
def test_static_qdq_weights_stored_sparse_run_identically(tmp_path, storage, monkeypatch):
    # uint8: the grid shifted by 128 that CPUs without VNNI get; its gap is closed around 128.
    # Each tensor judged alone (on the whole file the plain values may measure smaller: that is
    # the whole-file pass's call), so that the gap's decoding is what runs here.
    monkeypatch.setattr(sparse_storage, "WHOLE_FILE_WORK", 0)
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    calibration = builders.random_inputs(model, count=64, seed=3)
    dense, stored, _ = _both(model, [PRUNE, {**STATIC, "integer_weights": storage}], calibration=calibration)
    found = sparse_form.find_sparse_weights(stored.graph)
    gapped = [s for s in found if s.offsets is not None]
    assert gapped and all((s.center is not None) == (storage == "uint8") for s in gapped)
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    folded = _folded_initializers(stored, tmp_path / "folded.onnx")
    for s in found:
        assert folded[s.weight].dtype == np.dtype(storage) and np.array_equal(folded[s.weight], dense_w[s.weight])
        decoded = sparse_form.decoded_tensor(stored.graph, s, numpy_helper.to_array)
        assert np.array_equal(numpy_helper.to_array(decoded), dense_w[s.weight])
    feeds = builders.random_inputs(model, count=32)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)
    assert metrics.param_counts(stored) == metrics.param_counts(dense)
    assert _io(stored) == _io(model)


def test_dynamic_int8_b_weights_stored_sparse_run_identically():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, stored, _ = _both(model, [PRUNE, DYNAMIC])
    found = sparse_form.find_sparse_weights(stored.graph)
    assert found
    readers = {i for node in stored.graph.node if node.op_type == "DynamicQuantizeMatMul" for i in node.input}
    assert {s.weight for s in found} <= readers
    feeds = builders.random_inputs(model, count=32)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)
    assert metrics.param_counts(stored) == metrics.param_counts(dense)


def test_params_count_the_encoded_weights_and_not_the_mask(tmp_path):
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    params, nonzero = metrics.param_counts(stored)
    w1 = numpy_helper.to_array(next(t for t in dense.graph.initializer if t.name == "W1_quantized"))
    others = [numpy_helper.to_array(t) for t in dense.graph.initializer if t.name != "W1_quantized"]
    assert params == w1.size + sum(a.size for a in others)
    assert nonzero == np.count_nonzero(w1) + sum(np.count_nonzero(a) for a in others)
    # the same figures from the file with its tensors held as external data
    path = tmp_path / "external.onnx"
    builders.save_external(stored, path)
    assert metrics.param_counts(onnx.load(str(path), load_external_data=False), tmp_path) == (params, nonzero)


def test_a_sparse_form_that_would_grow_the_file_or_save_next_to_nothing_is_not_taken():
    model = builders.mlp(inputs=64, hidden=64, classes=4)
    rng = np.random.default_rng(0)
    # nine values about equally common: the fill is one ninth, so the mask and values (1/8 + 8/9 of
    # the bytes) outgrow the dense tensor, whatever zstd makes of them
    mostly_set = rng.integers(0, 9, size=(64, 64)).astype(np.int8)
    # one value off the fill: the sparse form is smaller, but saves under MIN_GAIN zstd bytes
    one_off = np.zeros((64, 64), dtype=np.int8)
    one_off[3, 5] = 7
    for name, q in (("mostly_set", mostly_set), ("one_off", one_off)):
        model.graph.initializer.append(numpy_helper.from_array(q, name))
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT8, [64, 64]))
    decisions = sparse_storage.store_sparse(model)
    assert decisions["mostly_set"]["bytes_sparse"] > decisions["mostly_set"]["bytes"]
    assert not decisions["mostly_set"]["sparse"]
    assert not decisions["one_off"]["sparse"]
    assert sparse_form.find_sparse_weights(model.graph) == []


def test_a_tensor_whose_fill_is_under_an_eighth_is_not_tried_and_says_so(monkeypatch):
    model = builders.mlp(inputs=64, hidden=64, classes=4)
    rng = np.random.default_rng(1)
    dense = rng.integers(-100, 100, size=(64, 64)).astype(np.int8)      # each value ~1/200 of it
    model.graph.initializer.append(numpy_helper.from_array(dense, "dense_q"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("dense_q", onnx.TensorProto.INT8, [64, 64]))
    tried = []
    monkeypatch.setattr(sparse_storage, "_sparse_forms", lambda q: tried.append(q.size) or [])
    row = sparse_storage.store_sparse(model)["dense_q"]
    fill, count = sparse_storage.fill_and_count(dense)
    assert tried == []
    assert row == {"elements": 4096, "fill": fill, "kept": 4096 - count, "bytes": 4096,
                   "bytes_sparse": 512 + 4096 - count + 1, "gap_closed": None, "sparse": False}
    assert row["bytes_sparse"] > row["bytes"]
    # at an eighth and more the forms are tried (and judged as before)
    half = np.where(rng.random((64, 64)) < 0.5, 0, dense).astype(np.int8)
    assert sparse_storage.smallest_sparse_bytes(half, sparse_storage.fill_and_count(half)[1]) < half.nbytes


def test_opset_below_11_is_left_dense():
    model = builders.mlp(inputs=64, hidden=64, classes=4, opset=10)
    q = np.zeros((64, 64), dtype=np.int8)
    q[::3] = 5
    model.graph.initializer.append(numpy_helper.from_array(q, "extra_int8"))
    assert sparse_storage.store_sparse(model) == {}


def _positions_model() -> onnx.ModelProto:
    """x[batch, 16, 64] + position[1, 16, 64] (a learned table, only added) -> MatMul W[64, 32]."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((0.02 * rng.standard_normal((1, 16, 64))).astype(np.float32), "position"),
             numpy_helper.from_array((rng.standard_normal((64, 32)) / 8).astype(np.float32), "W")]
    nodes = [helper.make_node("Add", ["x", "position"], ["h"], name="add_positions"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="proj")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 64])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 32])], inits)
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weight_only_int8_stores_a_learned_position_table_int8_per_tensor():
    model = _positions_model()
    table = numpy_helper.to_array(model.graph.initializer[0])
    quantized, ctx = _compress(model, [WEIGHT_ONLY], sparse=True)
    assert "position" not in {t.name for t in quantized.graph.initializer}
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "position")
    q = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == dq.input[0]))
    scale = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == dq.input[1]))
    assert q.dtype == np.int8 and scale.shape == ()
    np.testing.assert_array_equal(q, np.clip(np.rint(table / (np.abs(table).max() / np.float32(127))), -128, 127))
    record = ctx.layers["position"]
    assert record.bits == 8 and record.extra["granularity"] == "tensor" and record.extra["sqnr_db"] > 35
    feeds = builders.random_inputs(model, count=8)
    assert builders.rel_l2(builders.run_ort(model, feeds), builders.run_ort(quantized, feeds)) < 0.02
    assert _io(quantized) == _io(model)


def test_runner_stores_sparse_after_the_last_step_so_distill_still_refits(tmp_path):
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path))
    calibration = builders.random_inputs(model, count=128, seed=5)
    recipe = parse_recipe({"steps": [PRUNE, WEIGHT_ONLY, {"op": "distill", "method": "layerwise"}]})
    options = {"layer_errors": False, "latency_runs": 3}
    stored = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "sparse", options=dict(options))
    dense = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "dense",
                       options={**options, "sparse_storage": False})
    stored_model = onnx.load(str(stored.model_path))
    assert sparse_form.find_sparse_weights(stored_model.graph)
    assert not sparse_form.find_sparse_weights(onnx.load(str(dense.model_path)).graph)
    rows = stored.report["steps"][1]["sparse_storage"]
    assert rows["W1_quantized"]["sparse"] and rows["W1_quantized"]["kept"] <= 0.5 * 256 * 512
    for key in ("params", "nonzero_params", "macs"):
        assert stored.report["compressed"][key] == dense.report["compressed"][key]
    assert stored.report["size_ratio"] > dense.report["size_ratio"]
    assert stored.report["transport_size_ratio"] > dense.report["transport_size_ratio"]
    assert stored.report["fidelity"]["rel_l2"] == dense.report["fidelity"]["rel_l2"]
    layers = {row["name"]: row for row in stored.report["layers"]}
    assert "bitmask" in layers["W1"]["storage"] and layers["W1"]["bits"] == 8
    assert [(r["name"], r["bits"], r["sparsity"], r["params"]) for r in stored.report["layers"]] == \
        [(r["name"], r["bits"], r["sparsity"], r["params"]) for r in dense.report["layers"]]


def test_matmulnbits_8bit_b_pruned_weights_sit_at_128_and_are_counted_as_zeros():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    steps = [PRUNE, {**WEIGHT_ONLY, "format": "matmulnbits"}]
    dense, stored, _ = _both(model, steps)
    assert [n.op_type for n in stored.graph.node if n.op_type == "MatMulNBits"]
    found = sparse_form.find_sparse_weights(stored.graph)
    assert found
    for sparse in found:
        values = numpy_helper.to_array(next(t for t in stored.graph.initializer if t.name == sparse.values))
        assert values[0] == 128          # the zero point of symmetric 8-bit MatMulNBits
    feeds = builders.random_inputs(model, count=16)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)
    params, nonzero = metrics.param_counts(stored)
    assert (params, nonzero) == metrics.param_counts(dense)
    assert nonzero < 0.6 * params


def test_storing_an_already_sparse_model_again_keeps_its_decoding_intact():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    dense, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    before = len(stored.graph.node)
    again = onnx.ModelProto()
    again.CopyFrom(stored)
    # a dense int8 tensor with next to no repeated value: looked at, left dense
    noise = np.random.default_rng(6).integers(-127, 128, size=4096).astype(np.int8)
    again.graph.initializer.append(numpy_helper.from_array(noise, "noise"))
    decisions = sparse_storage.store_sparse(again)
    assert decisions["noise"]["sparse"] is False
    onnx.checker.check_model(again, full_check=True)
    assert len(again.graph.node) == before
    assert {t.name for t in again.graph.initializer} == {t.name for t in stored.graph.initializer} | {"noise"}
    feeds = builders.random_inputs(model, count=8)
    for a, b in zip(builders.run_ort(dense, feeds), builders.run_ort(again, feeds)):
        assert np.array_equal(a, b)




def test_the_bytes_a_sparse_form_saves_are_the_graphs_bytes_it_saves():
    # counted on the rewrite's own tensors and nodes, not by serializing the model twice
    model, _ = _compress(builders.mlp(inputs=256, hidden=512, classes=16), [PRUNE, WEIGHT_ONLY], sparse=False)
    shared, _ = sparse_storage._shared_constants(model)
    tensors = list(sparse_storage.candidates(model))
    assert tensors
    for tensor in tensors:
        packed = sparse_storage._sparse_forms(numpy_helper.to_array(tensor))[0]
        before = model.graph.ByteSize()
        rewrite = sparse_storage._apply(model, sparse_storage._dense(model, tensor.name), packed, shared)
        assert sparse_storage._bytes_saved(model, rewrite) == before - model.graph.ByteSize()
        sparse_storage._undo(model, rewrite)
