"""The output format, chosen once the last step has run (between the steps and the checks of the
result): all-zero zero points left to ONNX's default (``zero_points``), how weight-only
DequantizeLinear is written (as is, or as constant-foldable Cast / Mul where that runs faster
here), identical small initializers (scales, zero points) stored once (``small_tensors``), pruned
integer weights stored as bitmask + values where the file compresses smaller, the initializers'
order in the file, the value_info the original carried, the original's shape annotations on
inputs and outputs that a step rewrote without changing them, and the names the steps invented made
short (``file_names``). Main-graph Constant nodes of a quantized model become initializers first,
so that identical ones (hard-swish's 3 and 6, repeated per layer) are stored once too.
Each decision is recorded in the metrics of the step it concerns."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import onnx

from core.recipe import QuantizeStep, Recipe
from worker.pipeline import data as data_mod
from worker.pipeline import file_names
from worker.pipeline.quantize import dequantize_form, file_layout, small_tensors, sparse_storage, zero_points
from worker.pipeline.step import StepContext


def _dequantize_form(model: onnx.ModelProto, step: Any, dataset: data_mod.Dataset, target: str,
                     options: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    """``dequantize_form.choose_form`` on the final model, with one batch of the data the report
    measures latency on; ``options["dequantize_form"]`` ("folded" | "qdq") forces it (tests; a goal
    minimizing size forces "qdq", the smaller file)."""
    forced = options.get("dequantize_form") or ("qdq" if getattr(step, "format", "auto") == "qdq" else None)
    feeds = next(dataset.head(1).batches(1))
    decision = dequantize_form.choose_form(model, feeds, target, forced=forced)
    for weight in decision["weights"]:
        if weight in layers:
            layers[weight].extra["format"] = "folded (Cast / Mul, constant-folded at load)"
    return decision


def drop_added_value_info(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """Keep only the value_info (intermediate shapes) the original carried. Steps add their own
    (shape inference, the opset upgrade int4 needs), and with shapes known ONNX Runtime fuses
    patterns it leaves alone in the original: on the bench transformer a SkipLayerNormalization that
    runs 5x slower than the Add and LayerNormalization it replaced, and a slower Softmax, which made
    the int4 model 1.10x slower than the float one (1.00x without them)."""
    kept = {value.name for value in original.graph.value_info}
    values = [value for value in compressed.graph.value_info if value.name in kept]
    del compressed.graph.value_info[:]
    compressed.graph.value_info.extend(values)


def restore_io_annotations(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """Give the compressed model's inputs and outputs the original's shape annotations where they
    describe the same tensor: same name, element type and rank, and no axis where both give a
    different fixed size. Steps that upgrade the opset or infer shapes rewrite these annotations
    (a symbolic ``Divsentence_embedding_dim_1`` becomes 384); that is no interface change, and the
    user keeps the names their code reads. Returns the names restored."""
    by_name = {value.name: value for value in list(original.graph.input) + list(original.graph.output)}
    restored = []
    for value in list(compressed.graph.input) + list(compressed.graph.output):
        before = by_name.get(value.name)
        if before is None or before.type == value.type or not before.type.HasField("tensor_type"):
            continue
        old, new = before.type.tensor_type, value.type.tensor_type
        if old.elem_type != new.elem_type or not old.HasField("shape") or not new.HasField("shape"):
            continue
        if len(old.shape.dim) != len(new.shape.dim):
            continue
        if any(a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value
               for a, b in zip(old.shape.dim, new.shape.dim)):
            continue          # two fixed sizes that disagree: a real change, check_result says so
        value.type.CopyFrom(before.type)
        restored.append(value.name)
    return restored


def finalize(model: onnx.ModelProto, recipe: Recipe, step_rows: Sequence[dict[str, Any]], ctx: StepContext, *,
             evaluation: data_mod.Dataset | None, calibration: data_mod.Dataset | None,
             chosen: QuantizeStep | None = None) -> dict[str, str]:
    """Put ``model`` (the last step's result, changed in place) in its output format; ``step_rows``
    are the steps' metrics rows, in recipe order, that the decisions are added to. With a ``goal``
    the recipe's quantize steps were not run as written: the search's row is the last one, and
    ``chosen`` the quantize setting it picked (None: a float or fp16 model). Returns the map of the
    file's short names to the names the steps wrote (``file_names.shorten``), for the report."""
    final: tuple[QuantizeStep, dict[str, Any]] | None = None
    if recipe.goal is not None:
        if chosen is not None:
            final = (chosen, step_rows[-1])
    else:
        quantized = [i for i, step in enumerate(recipe.steps) if step.op == "quantize"]
        if quantized:
            final = (recipe.steps[quantized[-1]], step_rows[quantized[-1]])
    if final is not None:
        step, row = final
        # all-zero zero points of symmetric weights and int32 biases: ONNX's default, not stored
        # (first: the Cast / Mul form below would otherwise carry them, and a Sub, into the file)
        row["zero_points_dropped"] = len(zero_points.drop_zero_points(model))
        # weight-only DequantizeLinear as constant-foldable Cast / Mul where that runs faster here
        row["dequantize_form"] = _dequantize_form(
            model, step, evaluation or calibration or data_mod.generated(ctx.original, count=1),
            ctx.target, ctx.options, ctx.layers)
        # the scales / zero points every Q/DQ pair and layer wrote, and the graph's constants,
        # identical ones stored once
        row["constants_lifted"] = small_tensors.lift_constants(model)
        row["shared_small_tensors"] = small_tensors.share_identical(model)
        if ctx.options.get("sparse_storage", True):
            # pruned integer weights as bitmask + values where the file compresses smaller
            # (a goal minimizing size judges by the file's own bytes: ``goal_search.run_goal`` says so)
            row["sparse_storage"] = sparse_storage.store_pipeline_output(
                model, ctx.layers, by=ctx.options.get("sparse_storage_by", "zstd"))
    # the names the steps invented, short (last: the report's layers read the steps' names through the map)
    row = final[1] if final is not None else (step_rows[-1] if step_rows else {})
    row["node_names_cleared"] = file_names.clear_added_node_names(model, ctx.original,
                                                                  ctx.options.get("file_node_names"))
    names = file_names.shorten(model, ctx.original)
    row["names_shortened"] = len(names)
    if step_rows:
        # each kind of tensor together, in the measured order zstd's per-block Huffman tables fit best
        # (integers and floats of quantized and clustered models; never a larger file after zstd)
        row["initializer_order"] = file_layout.order_initializers(model)
    drop_added_value_info(ctx.original, model)
    restore_io_annotations(ctx.original, model)
    return names
