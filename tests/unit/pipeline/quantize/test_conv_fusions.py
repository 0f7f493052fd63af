"""conv_fusions: per-channel Mul / Add after a Conv folded into it, hard-swish as one HardSwish op;
float outputs unchanged up to rounding (ONNX Runtime, before and after), and what must not fuse
left alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.unit.pipeline import builders
from worker.pipeline.quantize import conv_fusions

RNG = np.random.default_rng(11)


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _constant_node(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array, np.float32), name))


def _model(nodes, inits, opset=14, out_channels=8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_channels, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, tolerance: float = 1e-5) -> None:
    onnx.checker.check_model(after, full_check=True)
    feeds = {"x": RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    want, got = builders.run_ort(before, feeds)[0], builders.run_ort(after, feeds)[0]
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)


def _conv_affine(scale_shape=(8, 1, 1), shift_shape=(1, 8, 1, 1), shared=False) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _constant_node("scale", RNG.uniform(0.5, 2.0, scale_shape)),
             helper.make_node("Mul", ["scale", "c"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "shift"], ["y"], name="add")]
    inits = [_init("w", RNG.standard_normal((8, 3, 3, 3))), _init("b", RNG.standard_normal(8)),
             _init("shift", RNG.standard_normal(shift_shape))]
    if shared:      # the weight read by a second Conv too
        nodes += [helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["y_pre", "c2"], ["y"], name="sum")]
        nodes[3].output[0] = "y_pre"
    return _model(nodes, inits)


def test_a_per_channel_scale_and_shift_fold_into_the_conv():
    model = _conv_affine()
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert sorted(conv_fusions.fold_channel_affine(fused)) == ["add", "mul"]
    assert [n.op_type for n in fused.graph.node] == ["Conv"] and fused.graph.node[0].output[0] == "y"
    _same_outputs(model, fused)


def test_what_is_not_one_number_per_channel_or_is_shared_stays():
    for model in (_conv_affine(scale_shape=(8, 8, 1)), _conv_affine(shared=True)):
        fused = onnx.ModelProto()
        fused.CopyFrom(model)
        folded = conv_fusions.fold_channel_affine(fused)
        assert "mul" not in folded
        _same_outputs(model, fused)


def _hard_swish(kind: str, three: float = 3.0, opset: int = 14) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = [_init("w", RNG.standard_normal((8, 3, 3, 3)))]
    if kind == "clip":
        nodes += [_constant_node("three", three), _constant_node("zero", 0.0), _constant_node("six", 6.0),
                  helper.make_node("Add", ["c", "three"], ["a"], name="shift"),
                  helper.make_node("Clip", ["a", "zero", "six"], ["g"], name="clip"),
                  helper.make_node("Mul", ["c", "g"], ["m"], name="mul"),
                  helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    else:
        nodes += [helper.make_node("HardSigmoid", ["c"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["g", "c"], ["y"], name="mul")]
    return _model(nodes, inits, opset=opset)


def test_hard_swish_in_either_written_form_becomes_one_op():
    for kind in ("clip", "hard_sigmoid"):
        model = _hard_swish(kind)
        fused = onnx.ModelProto()
        fused.CopyFrom(model)
        assert len(conv_fusions.fuse_hard_swish(fused)) == 1
        assert [n.op_type for n in fused.graph.node] == ["Conv", "HardSwish"]
        assert not any(n.op_type == "Constant" for n in fused.graph.node)
        _same_outputs(model, fused, 1e-6)


def test_what_only_looks_like_hard_swish_stays():
    for model in (_hard_swish("clip", three=2.0), _hard_swish("clip", opset=13)):
        fused = onnx.ModelProto()
        fused.CopyFrom(model)
        assert conv_fusions.fuse_hard_swish(fused) == []
        assert "HardSwish" not in [n.op_type for n in fused.graph.node]
    assert conv_fusions.has_hard_swish(_hard_swish("clip", opset=13))


def test_static_int8_raises_the_opset_for_hard_swish_and_stays_close():
    from core.recipe import QuantizeStep
    from worker.pipeline.quantize.static import quantize_static
    from worker.pipeline.step import StepContext
    model = _hard_swish("clip", opset=13)
    calibration = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    params = QuantizeStep(op="quantize", weights={"bits": 8}, activations={"calibration": "minmax"}, min_params=0,
                          min_products=0)
    result = quantize_static(model, params, StepContext(original=model, calibration=calibration))
    onnx.checker.check_model(result.model, full_check=True)
    assert "HardSwish" in [n.op_type for n in result.model.graph.node]
    feeds = {"x": RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    want, got = builders.run_ort(model, feeds)[0], builders.run_ort(result.model, feeds)[0]
    assert np.linalg.norm(got - want) < 0.05 * np.linalg.norm(want)


def _affine_in_front(pads: list[int], group: int) -> onnx.ModelProto:
    """relu -> Mul(c) -> Add(d) -> Conv (grouped or not, padded or not)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "scale"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "shift"], ["a"], name="add"),
             helper.make_node("Conv", ["a", "w", "b"], ["y"], name="conv", pads=pads, group=group)]
    kernel = 3 if any(pads) else 1
    inits = [_init("scale", RNG.uniform(0.5, 2.0, (3, 1, 1))), _init("shift", RNG.standard_normal((3, 1, 1))),
             _init("w", RNG.standard_normal((6, 3 // group, kernel, kernel))), _init("b", RNG.standard_normal(6))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def test_an_affine_in_front_of_convs_folds_into_their_input_channels():
    unpadded = _affine_in_front([0, 0, 0, 0], 1)
    fused = onnx.ModelProto()
    fused.CopyFrom(unpadded)
    assert sorted(conv_fusions.fold_input_affine(fused)) == ["add", "mul"]
    assert [n.op_type for n in fused.graph.node] == ["Relu", "Conv"]
    _same_outputs(unpadded, fused)
    for group in (1, 3):        # padded: the scale folds (zeros stay zeros), the shift stays, divided by it
        padded = _affine_in_front([1, 1, 1, 1], group)
        fused = onnx.ModelProto()
        fused.CopyFrom(padded)
        assert conv_fusions.fold_input_affine(fused) == ["mul"]
        assert [n.op_type for n in fused.graph.node] == ["Relu", "Add", "Conv"]
        _same_outputs(padded, fused)


def test_cleanup_folds_and_fuses_too():
    from core.recipe import CleanupStep
    from worker.pipeline.step import StepContext
    from worker.pipeline.steps import cleanup
    for model, gone in ((_hard_swish("clip"), {"Clip", "Div"}), (_conv_affine(), {"Mul", "Add"})):
        result = cleanup.run(model, CleanupStep(op="cleanup"), StepContext(original=model))
        assert not gone & {n.op_type for n in result.model.graph.node}
        assert result.metrics["affine_folded"] + result.metrics["hard_swish_fused"] >= 1
        _same_outputs(model, result.model, 1e-5)


def test_a_folded_layer_keeps_its_per_layer_error_in_the_report(tmp_path):
    """The Conv now writes the folded Add's tensor: the report compares that one (the recognizer's
    per-layer errors had lost 23 of 36 layers), with the measuring batch bounded by its inputs."""
    from core.recipe import parse_recipe
    from worker.pipeline import runner
    model = _conv_affine()
    model.graph.node[-1].output[0] = "a"
    model.graph.node.append(helper.make_node("Relu", ["a"], ["r"], name="relu"))
    model.graph.node.append(helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
    model.graph.initializer.append(_init("w2", RNG.standard_normal((8, 8, 1, 1))))
    path = tmp_path / "affine.onnx"
    onnx.save(model, path)
    calibration = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    recipe = parse_recipe({"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {},
                                      "min_params": 0, "min_products": 0}]})
    report = runner.run(path, recipe, calibration=calibration, workdir=tmp_path / "w",
                        options={"latency_runs": 2, "latency_budget_s": 0.5}).report
    rows = {row["name"]: row for row in report["layers"]}
    assert report["steps"][0]["affine_folded"] == 2
    assert rows["w"]["output_rel_l2"] is not None and rows["w"]["output_rel_l2"] < 0.05
