"""The ``quantize`` step (CONTRACT.md §1): checks the recipe against the model, then hands the
work to the quantizer the recipe names.

- ``activations`` set: int8 activations too, static (QDQ, calibrated ranges:
  ``quant.static.quantize_static``) or ``calibration: dynamic`` (``quant.dynamic.quantize_dynamic``);
- ``weights.bits`` 1: sign quantization, ``w' = alpha * sign(w)`` (``quant.sign``);
- otherwise weight-only int8 / int4 / int2, RTN or GPTQ (``quant.weight_only``).

Whichever quantizer ran, the int8 / uint8 weights it left (and any an earlier step left) are then
stored sparse where that compresses smaller (``quant.sparse_storage``): a bitmask of the non-zero
positions and the non-zero values, decoded by ONNX Runtime's constant folding at load. Pruned
weights then shrink the file and its zstd size, not only the count of non-zeros.
"""
from __future__ import annotations

import onnx

from core.recipe import QuantizeStep
from worker.pipeline.quant import sparse_storage, weight_only
from worker.pipeline.step import StepContext, StepResult

name = "quantize"
Params = QuantizeStep


def check(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> None:
    """Refuse (RecipeError, path relative to the step) a quantize step that cannot apply."""
    if params.activations is not None:
        if params.activations.calibration == "dynamic":
            from worker.pipeline.quant import dynamic as module
        else:
            from worker.pipeline.quant import static as module
        hook = getattr(module, "check", None)
        if hook is not None:
            hook(model, params, ctx)
        return
    weight_only.refuse_empty_selection(model, params)


def run(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    result = _quantize(model, params, ctx)
    if not ctx.options.get("sparse_storage", True):
        return result
    ctx.progress(0.95, "sparse storage")
    decisions = sparse_storage.store_sparse(result.model)
    if decisions:
        _note_storage(result, decisions, ctx)
    return result


def _note_storage(result: StepResult, decisions: dict[str, dict], ctx: StepContext) -> None:
    """The step's metrics list every integer weight looked at; a layer whose stored weight went
    sparse says so in its record (the report's ``storage``). Bits, sparsity and params of the
    layer do not change: the decoded tensor is the dense one, value for value."""
    result.metrics["sparse_storage"] = decisions
    for stored, row in decisions.items():
        if not row["sparse"]:
            continue
        # every quantizer names a weight's integer tensor "<weight>_<suffix>" (graph.unique_name)
        owners = [name for name in ctx.layers if stored == name or stored.startswith(f"{name}_")]
        if owners:
            ctx.layers[max(owners, key=len)].extra["storage"] = (
                f"bitmask + {row['kept']} of {row['elements']} values (the rest {row['fill']})")


def _quantize(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    if params.activations is not None:
        if params.activations.calibration == "dynamic":
            from worker.pipeline.quant.dynamic import quantize_dynamic
            return quantize_dynamic(model, params, ctx)
        from worker.pipeline.quant.static import quantize_static
        return quantize_static(model, params, ctx)
    if params.weights.bits == 1:
        from worker.pipeline.quant.sign import quantize_sign
        return quantize_sign(model, params, ctx)
    return weight_only.quantize_weights(model, params, ctx)
