"""The ``quantize`` step (CONTRACT.md §1): checks the recipe against the model, then hands the
work to the quantizer the recipe names.

- ``activations`` set: int8 activations too, static (QDQ, calibrated ranges:
  ``quant.static.quantize_static``) or ``calibration: dynamic`` (``quant.dynamic.quantize_dynamic``);
- ``weights.bits`` 1: sign quantization, ``w' = alpha * sign(w)`` (``quant.sign``);
- otherwise weight-only int8 / int4 / int2, RTN or GPTQ (``quant.weight_only``).
"""
from __future__ import annotations

import onnx

from core.recipe import QuantizeStep
from worker.pipeline.quant import weight_only
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
