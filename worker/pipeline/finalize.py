"""The output format, chosen once the last step has run (between the steps and the checks of the
result): how weight-only DequantizeLinear is written (as is, or as constant-foldable Cast / Mul
where that runs faster here), pruned integer weights stored as bitmask + values where the file
compresses smaller, the initializers' order in the file, and the value_info the original carried.
Each decision is recorded in the metrics of the step it concerns."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import onnx

from core.recipe import Recipe
from worker.pipeline import data as data_mod
from worker.pipeline.quantize import dequantize_form, file_layout, sparse_storage
from worker.pipeline.step import StepContext


def _dequantize_form(model: onnx.ModelProto, step: Any, dataset: data_mod.Dataset, target: str,
                     options: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    """``dequantize_form.choose_form`` on the final model, with one batch of the data the report
    measures latency on; ``options["dequantize_form"]`` ("folded" | "qdq") forces it (tests)."""
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


def finalize(model: onnx.ModelProto, recipe: Recipe, step_rows: Sequence[dict[str, Any]], ctx: StepContext, *,
             evaluation: data_mod.Dataset | None, calibration: data_mod.Dataset | None) -> None:
    """Put ``model`` (the last step's result, changed in place) in its output format; ``step_rows``
    are the steps' metrics rows, in recipe order, that the decisions are added to."""
    quantized = [i for i, step in enumerate(recipe.steps) if step.op == "quantize"]
    if quantized:
        row = step_rows[quantized[-1]]
        # weight-only DequantizeLinear as constant-foldable Cast / Mul where that runs faster here
        row["dequantize_form"] = _dequantize_form(
            model, recipe.steps[quantized[-1]], evaluation or calibration or data_mod.generated(ctx.original, count=1),
            ctx.target, ctx.options, ctx.layers)
        if ctx.options.get("sparse_storage", True):
            # pruned integer weights as bitmask + values where the file compresses smaller
            row["sparse_storage"] = sparse_storage.store_pipeline_output(model, ctx.layers)
    if step_rows:
        # each kind of tensor together, in the measured order zstd's per-block Huffman tables fit best
        # (integers and floats of quantized and clustered models; never a larger file after zstd)
        step_rows[quantized[-1] if quantized else -1]["initializer_order"] = file_layout.order_initializers(model)
    drop_added_value_info(ctx.original, model)
