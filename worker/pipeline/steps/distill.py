"""The ``distill`` step: win back what compression cost, with the original model as the teacher.

``method: layerwise`` (numpy, no labels): every layer an earlier step changed (a ``LayerRecord``
with a mask, grid, codebook or low-rank factors) is refit in closed form so that, on the student's
own inputs, its outputs match the teacher's outputs of the same layer on the calibration data:

    min_{W, b} ||A_student W + 1 b^T - T_teacher||^2 + damping * mean(diag(A^T A)) * ||W||^2

under the constraints the earlier steps left (zeros stay zero, integers stay on their grid, shared
values stay shared, ranks stay), layer after layer in topological order. Layers that channel
pruning narrowed are matched to the teacher's surviving output channels (the record's
``kept_outputs``). Weights may be float, behind DequantizeLinear, in MatMulNBits or
DynamicQuantizeMatMul, or a cluster codebook; embedding lookups are left alone (with no input to
adapt to, their best fit is the original rows). The math is in ``worker.pipeline.distill.layerwise``.

``method: kd`` (PyTorch CPU, the optional extra ``featherweight[distill]``): the student's float
weights are trained on the teacher's softened outputs,

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, labels)

(cross-entropy only where ``_labels`` are given; outputs that are not [batch, classes] logits are
matched by mean squared error relative to the teacher's variance), with the constraints held during
training (masked weights multiplied by their mask, quantized weights fake-quantized on their grid
with a straight-through gradient, shared values trained as the centroids themselves), then written
back into the ONNX graph. See ``worker.pipeline.distill.kd``.

A separate student (``ctx.options["student_model"]``, from ``student_model_id`` / ``--student``)
must have the original's inputs and outputs; it is trained with ``kd`` and replaces the model.
Everything that can refuse the step does so before any work, with the field's path.
"""
from __future__ import annotations

import fnmatch
import importlib.util
from typing import Any

import numpy as np
import onnx

from core.errors import InvalidInput, RecipeError
from core.recipe import DistillStep
from worker.pipeline import data as data_mod
from worker.pipeline import graph, sensitivity, sessions, subgraphs
from worker.pipeline.distill import layerwise
from worker.pipeline.distill.layers import linear_layer
from worker.pipeline.quantize import lift_constants
from worker.pipeline.sequential import budget_of
from worker.pipeline.step import LayerRecord, StepContext, StepResult

name = "distill"
Params = DistillStep

LAYERWISE_MIN_BATCH = 128   # layerwise only sums statistics: bigger batches just mean fewer runtime calls


def _path(ctx: StepContext | None, field: str) -> list[Any]:
    """The recipe path of ``field``. From ``check`` (``ctx`` None) it is relative: the runner puts
    ``["steps", i]`` in front. From ``run`` it is absolute where the runner passed ``step_index``."""
    index = ctx.options.get("step_index") if ctx is not None else None
    return ["steps", index, field] if isinstance(index, int) else [field]


def _refuse(ctx: StepContext | None, field: str, message: str) -> RecipeError:
    return RecipeError(message, [{"loc": _path(ctx, field), "msg": message}])


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _io(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    inits = {t.name for t in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> tuple:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim) \
            if tensor_type.HasField("shape") else None
        return value.name, tensor_type.elem_type, dims

    return [describe(v) for v in model.graph.input if v.name not in inits], [describe(v) for v in model.graph.output]


def _check_student(teacher: onnx.ModelProto, student: onnx.ModelProto, ctx: StepContext | None) -> None:
    want, got = _io(teacher), _io(student)
    for kind, a, b in (("inputs", want[0], got[0]), ("outputs", want[1], got[1])):
        if [(n, t) for n, t, _ in a] != [(n, t) for n, t, _ in b]:
            raise _refuse(ctx, "student_model_id", f"the student's {kind} {[(n, t) for n, t, _ in b]} differ from "
                                                   f"the original's {[(n, t) for n, t, _ in a]}")
        for (n, _, da), (_, _, db) in zip(a, b):
            if da is not None and db is not None and (len(da) != len(db) or any(
                    x is not None and y is not None and x != y for x, y in zip(da, db))):
                raise _refuse(ctx, "student_model_id", f"the student's {kind[:-1]} {n!r} has shape {db}; "
                                                       f"the original's is {da}")


def _check_kd(student: onnx.ModelProto, ctx: StepContext | None) -> None:
    if not torch_available():
        raise _refuse(ctx, "method", "method kd needs PyTorch, which is not installed: install featherweight[distill]")
    from worker.pipeline.distill.torch_graph import unsupported_ops

    missing = unsupported_ops(student)
    if missing:
        raise _refuse(ctx, "method", f"method kd cannot train this model: unsupported ops {', '.join(missing)} "
                                     f"(use method layerwise, or export the model without them)")


def check(model: onnx.ModelProto, params: DistillStep, ctx: StepContext) -> None:
    """Refuse what cannot work before any step runs (the runner prefixes ``["steps", i]``)."""
    student = ctx.options.get("student_model")
    if params.student_model_id is not None and student is None:
        raise RecipeError("student_model_id was given but no student model was loaded",
                          [{"loc": ["student_model_id"], "msg": "student model not loaded"}])
    if student is not None:
        _check_student(ctx.original, student, None)
        if params.method == "layerwise":
            raise RecipeError("method layerwise refits the layers earlier steps compressed; a separate student has "
                              "no such layers: use method kd", [{"loc": ["method"], "msg": "use kd with a student"}])
    if ctx.calibration is None:
        raise RecipeError("distill needs calibration data", [{"loc": ["method"], "msg": "needs calibration data"}])
    if params.method == "kd":
        _check_kd(student if student is not None else model, None)


def _changed(record: LayerRecord) -> bool:
    return (record.mask is not None or record.grid is not None or record.codebook is not None
            or record.factors is not None or record.sparsity > 0 or record.bits < 32 or record.rank is not None)


def _selected(params: DistillStep, record: LayerRecord, teacher: onnx.ModelProto) -> bool:
    names = (record.weight, record.node)
    if params.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in params.include):
        return False
    if any(fnmatch.fnmatchcase(n, p) for n in names for p in params.exclude):
        return False
    # min_params narrows only when given: the layers to refit are those earlier steps chose
    if "min_params" in params.model_fields_set:
        init = graph.initializers(teacher).get(record.weight)
        if init is not None and int(np.prod(init.dims)) < params.min_params:
            return False
    return True


def _weight_consumer(model: onnx.ModelProto, weight: str) -> onnx.NodeProto | None:
    """The layer reading ``weight`` directly, or through a DequantizeLinear of it."""
    uses = graph.consumers(model)
    for node, _ in uses.get(weight, []):
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            return node
        if node.op_type == "DequantizeLinear":
            for inner, index in uses.get(node.output[0], []):
                if index == 1:
                    return inner
    return None


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes only resolve SAME padding; the layer is skipped without them
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def plan_layerwise(student: onnx.ModelProto, teacher: onnx.ModelProto, params: DistillStep,
                   layers: dict[str, LayerRecord]) -> tuple[list[layerwise.LayerFit], list[dict]]:
    """The layers to refit, in the student's topological order, and the ones skipped with why."""
    nodes_s = {n.name: n for n in student.graph.node if n.name}
    nodes_t = {n.name: n for n in teacher.graph.node if n.name}
    shapes_s, shapes_t = _shapes(student), _shapes(teacher)
    fits: list[layerwise.LayerFit] = []
    skipped: list[dict] = []
    # what layers inside If / Loop / Scan bodies read (a weight of the body's own, or the outer scope's)
    in_bodies = {name for _, node, body in subgraphs.body_nodes(teacher)
                 for name in [*node.input, *(t.name for t in body.initializer)]}
    for key, record in layers.items():
        if not _changed(record) or not _selected(params, record, teacher):
            continue
        teacher_node = nodes_t.get(record.node) or _weight_consumer(teacher, record.weight)
        teacher_layer, why = linear_layer(teacher, teacher_node, input_shapes=shapes_t) if teacher_node is not None \
            else (None, "inside an If / Loop / Scan body, which layerwise refits do not reach" if record.weight in in_bodies
                  else "the original has no main-graph layer reading it")
        if teacher_layer is None:
            skipped.append({"name": key, "reason": why})
            continue
        if record.factors is not None:
            factor = record.factors[1]
            student_node = _weight_consumer(student, factor)
            own = layers.get(factor)
        else:
            student_node = nodes_s.get(record.node)
            if student_node is None or student_node.op_type not in ("MatMul", "Gemm", "Conv"):
                student_node = _weight_consumer(student, record.weight) or student_node
            own = record
        if student_node is None:
            skipped.append({"name": key, "reason": "the compressed model has no layer reading this weight"})
            continue
        layer, why = linear_layer(student, student_node, grid_bits=own.grid if own is not None else None,
                                  input_shapes=shapes_s)
        if layer is None:
            skipped.append({"name": key, "reason": why})
            continue
        # an original's bias the compressed layer has no room for would be left out of the match (a
        # fixed one is taken off the target); the other way round is fine: a bias static int8's bias
        # correction gave a Conv that had none is refit towards the original's output like the rest
        if (layer.bias is None and layer.fixed_bias is None) and not (teacher_layer.bias is None and teacher_layer.fixed_bias is None):
            skipped.append({"name": key, "reason": "the original layer has a bias the compressed one lacks"})
            continue
        first = None
        if record.factors is not None and own is None and layers.get(record.factors[0]) is None:
            first_node = _weight_consumer(student, record.factors[0])
            first_layer = linear_layer(student, first_node, input_shapes=shapes_s)[0] if first_node is not None else None
            if first_layer is not None and layerwise.pointwise_pair(first_layer, layer) and all(
                    w.grid is None and w.labels is None for w in (first_layer.weight, layer.weight)):
                first = first_layer
        constraints = layerwise.Constraints()
        if own is not None:
            if own.mask is not None and tuple(np.shape(own.mask)) == layer.weight.shape:
                constraints.mask = np.asarray(own.mask, dtype=bool)
            elif own.sparsity > 0:
                # the zeros in the file are the constraint when no mask was recorded
                constraints.mask = layer.weight.read(student) != 0
            if own.codebook is not None:
                constraints.codebook = np.asarray(own.codebook)
        channels = (own.extra.get("kept_outputs") if own is not None else None)
        width = layer.weight.shape[0] if layer.kind == "conv" or layer.trans_b else layer.weight.shape[-1]
        teacher_width = teacher_layer.weight.shape[0] if teacher_layer.kind == "conv" or teacher_layer.trans_b \
            else teacher_layer.weight.shape[-1]
        if channels is not None and len(channels) != width:
            channels = None
        if (channels is None and width != teacher_width) or (channels is not None and max(channels) >= teacher_width):
            skipped.append({"name": key, "reason": f"the layer has {width} outputs, the original {teacher_width}, "
                                                   f"and no record of which ones it kept"})
            continue
        fits.append(layerwise.LayerFit(key, layer, teacher_layer.output, constraints, first,
                                       None if channels is None or width == teacher_width else list(channels)))
    order = {node.name: i for i, node in enumerate(graph.topological_nodes(student))}
    fits.sort(key=lambda f: order.get(f.layer.node.name, len(order)))
    return fits, skipped


def _dataset(ctx: StepContext, field: str = "method"):
    if ctx.calibration is None:
        raise _refuse(ctx, field, "distill needs calibration data")
    try:
        dataset = data_mod.bind(ctx.original, ctx.calibration)
    except data_mod.DataError as exc:
        raise InvalidInput(f"calibration: {exc}", [{"loc": ["calibration", *exc.path], "msg": str(exc)}]) from None
    if dataset.size == 0:
        raise InvalidInput("calibration: the data set holds no samples", [{"loc": ["calibration"], "msg": "no samples"}])
    return dataset


def run(model: onnx.ModelProto, params: DistillStep, ctx: StepContext) -> StepResult:
    student = ctx.options.get("student_model")
    if student is not None:
        _check_student(ctx.original, student, ctx)
    dataset = _dataset(ctx)
    if params.method == "layerwise":
        if student is not None:
            raise _refuse(ctx, "method", "method layerwise refits the layers earlier steps compressed; a separate "
                                         "student has no such layers: use method kd")
        return _run_layerwise(model, params, ctx, dataset)
    target = student if student is not None else model
    _check_kd(target, ctx)
    from worker.pipeline.distill import kd

    trained, metrics = kd.distill(target, ctx.original, dataset, params,
                                  layers=ctx.layers if student is None else {},
                                  progress=ctx.progress, check_cancelled=ctx.check_cancelled)
    return StepResult(trained, metrics.pop("changed"), {"method": "kd", **metrics})


def _lifted_teacher(original: onnx.ModelProto) -> onnx.ModelProto:
    """The original with its Constant-node weights lifted to initializers, as the compressing steps
    lifted the student's (same names): a converter's teacher (paddle2onnx) otherwise has no
    constant weight to refit against, and every layer was refused as "not a constant"."""
    if not lift_constants.constant_weights(original):
        return original
    teacher = onnx.ModelProto()
    teacher.CopyFrom(original)
    lift_constants.lift_constant_weights(teacher)
    return teacher


def _run_layerwise(model: onnx.ModelProto, params: DistillStep, ctx: StepContext, dataset) -> StepResult:
    teacher = _lifted_teacher(ctx.original)
    fits, skipped = plan_layerwise(model, teacher, params, ctx.layers)
    if not fits:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or \
            "no earlier step compressed a layer (run prune, lowrank, cluster or quantize first)"
        raise _refuse(ctx, "method", f"method layerwise has no layer to refit: {reasons}")
    student = onnx.ModelProto()
    student.CopyFrom(model)
    rows = layerwise.run(student, teacher, fits, dataset, damping=params.damping,
                         batch_size=max(params.batch_size, LAYERWISE_MIN_BATCH), progress=ctx.progress,
                         check_cancelled=ctx.check_cancelled, cost=ctx.cost,
                         budget_bytes=budget_of(ctx.options))
    with ctx.cost.phase("evaluate"):
        before, after = _output_errors(teacher, model, student, dataset)
    if after > before:
        # each refit lowers its own layer's error on the data, yet together they raised the model's
        # (measured on a ViT after int4 / int8 / GPTQ: output rel_l2 0.114 -> 0.200): the step keeps
        # the model it was given rather than hand on a worse one, and says so
        for row in rows:
            row["kept"] = True
        return StepResult(model, [], {"method": "layerwise", "layers": rows, "skipped": skipped,
                                      "reverted": {"output_rel_l2_before": before, "output_rel_l2_after": after,
                                                   "samples": min(dataset.size, GUARD_SAMPLES)}})
    changed = []
    for item, row in zip(fits, rows):
        if row["kept"]:
            continue
        changed.append(item.layer.weight.name)
        if item.first is not None:
            changed.append(item.first.weight.name)
        if item.layer.bias is not None:
            changed.append(item.layer.bias.name)
        record = ctx.layers.get(item.key)
        if record is not None and record.factors is None and item.constraints.codebook is not None:
            record.codebook = item.constraints.codebook
    return StepResult(student, changed, {"method": "layerwise", "layers": rows, "skipped": skipped,
                                         "output_rel_l2": {"before": before, "after": after}})


GUARD_SAMPLES = 64      # samples the whole-model check after the refits runs on
GUARD_BATCH = 16


def _output_errors(teacher: onnx.ModelProto, before: onnx.ModelProto, after: onnx.ModelProto,
                   dataset) -> tuple[float, float]:
    """Output rel_l2 against the teacher of the student before and after the refits, on the first
    GUARD_SAMPLES samples of the data they were fitted on."""
    data = dataset.head(GUARD_SAMPLES)

    def outputs(model: onnx.ModelProto) -> list[np.ndarray]:
        # one session at a time, no pre-packed copy, buffers handed back: three sessions of a 90 MB
        # encoder at once took the step past its memory bound (2x the float model + 1 GiB)
        session = sessions.session(model, threads=1, prepack=False, arena=False, spin=False)
        got = [session.run(None, feeds) for feeds in data.batches(GUARD_BATCH)]
        del session
        # flat: samples of unequal shapes (token counts) read as one vector per output
        return [np.concatenate([np.asarray(batch[i]).ravel() for batch in got]) for i in range(len(got[0]))]

    found = [outputs(model) for model in (teacher, before, after)]
    # an output whose size depends on the data (NonMaxSuppression) is compared only where it held
    kept = [i for i in range(len(found[0])) if found[0][i].shape == found[1][i].shape == found[2][i].shape]
    reference, was, now = ([values[i] for i in kept] for values in found)
    return sensitivity.rel_l2(reference, was), sensitivity.rel_l2(reference, now)


__all__ = ["name", "Params", "run", "check", "plan_layerwise"]
