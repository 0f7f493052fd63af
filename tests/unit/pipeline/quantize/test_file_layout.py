"""file_layout: the initializers' order in the file, measured against zstd; the model is unchanged."""
from __future__ import annotations

import numpy as np
import onnx

from tests.unit.pipeline import builders
from tests.unit.pipeline.quantize.test_sparse_storage import PRUNE, WEIGHT_ONLY, _both
from worker.pipeline.quantize import file_layout, sparse_form


def _kinds(model: onnx.ModelProto) -> list[str]:
    found = sparse_form.find_sparse_weights(model.graph)
    masks = {s.mask for s in found}
    values = {s.values for s in found} | {s.offsets for s in found if s.offsets is not None}
    return [file_layout.kind_of(t, masks, values) for t in model.graph.initializer]


def test_arranging_puts_each_kind_together_in_the_order_asked():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    _, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    order = (file_layout.MASKS, file_layout.FLOATS, file_layout.REST, file_layout.INTEGERS, file_layout.VALUES)
    before = sorted(t.name for t in stored.graph.initializer)
    file_layout.arrange(stored, order)
    kinds = _kinds(stored)
    assert kinds == sorted(kinds, key=order.index)
    assert {file_layout.MASKS, file_layout.VALUES, file_layout.FLOATS} <= set(kinds)
    assert sorted(t.name for t in stored.graph.initializer) == before


def test_ordering_keeps_the_model_and_never_grows_its_zstd_bytes():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    _, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    file_layout.arrange(stored, tuple(reversed(file_layout.DEFAULT_ORDER)))     # a poor start
    before = file_layout.zstd_size(stored.SerializeToString())
    names = sorted(t.name for t in stored.graph.initializer)
    feeds = builders.random_inputs(model, count=8)
    expected = builders.run_ort(stored, feeds)
    decision = file_layout.order_initializers(stored)
    after = file_layout.zstd_size(stored.SerializeToString())
    assert after <= before and sorted(t.name for t in stored.graph.initializer) == names
    assert decision["orders_measured"] == 120                  # every order of the five kinds present
    if decision["arranged"]:
        assert decision["file_zstd_arranged"] == after < before == decision["file_zstd"]
        kinds = _kinds(stored)
        assert kinds == sorted(kinds, key=decision["order"].index)
    for a, b in zip(expected, builders.run_ort(stored, feeds)):
        assert np.array_equal(a, b)


def test_the_spliced_file_is_the_serialized_file_in_every_order():
    import itertools

    model = builders.mlp(inputs=256, hidden=512, classes=16)
    _, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    serialized = file_layout.Serialized(stored)
    assert serialized.start is not None
    parts = file_layout._sparse_parts(stored)
    kinds = tuple(k for k in file_layout.DEFAULT_ORDER if k in set(_kinds(stored)))
    for order in itertools.permutations(kinds):
        copy = onnx.ModelProto()
        copy.CopyFrom(stored)
        file_layout.arrange(copy, order, parts)
        assert serialized.spliced(file_layout.order_of(stored, order, parts)) == copy.SerializeToString()


def test_past_the_limits_nothing_is_moved_or_measured():
    model = builders.mlp(inputs=256, hidden=512, classes=16)
    _, stored, _ = _both(model, [PRUNE, WEIGHT_ONLY])
    before = stored.SerializeToString()
    assert file_layout.order_initializers(stored, limit=100) == {"arranged": False}
    assert file_layout.order_initializers(stored, work=stored.ByteSize() * 3) == {"arranged": False,
                                                                                  "orders_measured": 0}
    assert stored.SerializeToString() == before


def test_the_runner_lays_out_every_recipes_output_not_only_quantized_ones(tmp_path):
    from core.recipe import parse_recipe
    from worker.pipeline import runner

    model = builders.mlp(inputs=256, hidden=512, classes=16)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path))
    recipe = parse_recipe({"steps": [{"op": "cluster", "bits": 4, "min_params": 0}]})
    result = runner.run(path, recipe, workdir=tmp_path / "out", options={"layer_errors": False, "latency_runs": 2})
    order = result.report["steps"][-1]["initializer_order"]
    if order["arranged"]:
        assert order["file_zstd_arranged"] < order["file_zstd"]
    assert order.get("orders_measured", 0) >= 1
