"""The ``quantize`` step (docs/recipes.md): checks the recipe against the model, then hands the
work to the quantizer the recipe names.

- ``activations`` set: int8 activations too, static (QDQ, calibrated ranges:
  ``quantize.static.quantize_static``) or ``calibration: dynamic`` (``quantize.dynamic.quantize_dynamic``);
- ``weights.bits`` 1: sign quantization, ``w' = alpha * sign(w)`` (``quantize.sign``);
- otherwise weight-only int8 / int4 / int2, RTN or GPTQ (``quantize.weight_only``); large float
  tables that no layer multiplies and that are only sliced or added (learned position tables) go
  int8 per tensor behind a DequantizeLinear, as static and dynamic int8 store them
  (``quantize.static.quantize_table``): left float they are the biggest float tensor of a
  transformer's weight-only model.

The int8 / uint8 weights a quantizer leaves are stored sparse (bitmask + values) where that
compresses smaller, once the whole recipe has run (``finalize`` -> ``quantize.sparse_storage``): a
later step (``distill``) reads the quantized weights as initializers.
"""
from __future__ import annotations

import numpy as np
import onnx

from core.errors import RecipeError
from core.recipe import QuantizeStep
from worker.pipeline import graph, metrics
from worker.pipeline.quantize import weight_only
from worker.pipeline.step import LayerRecord, StepContext, StepResult

name = "quantize"
Params = QuantizeStep


def check(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> None:
    """Refuse (RecipeError, path relative to the step) a quantize step that cannot apply."""
    if params.activations is not None:
        refuse_float16_activations(model, params)
        if params.activations.calibration == "dynamic":
            from worker.pipeline.quantize import dynamic as module
        else:
            from worker.pipeline.quantize import static as module
        hook = getattr(module, "check", None)
        if hook is not None:
            hook(model, params, ctx)
        return
    weight_only.refuse_empty_selection(model, params)


def refuse_float16_activations(model: onnx.ModelProto, params: QuantizeStep) -> None:
    """int8 activations need float32 layers: ONNX Runtime's integer kernels and the QDQ pairs
    around them take float32, so a float16 model was refused deep inside the run (a type clash in
    ONNX Runtime) or, by dynamic int8, as if it had no weight at all."""
    inits = graph.initializers(model)
    layers = graph.weight_layers(model, ops=("Conv", "MatMul", "Gemm"), include=params.include,
                                 exclude=params.exclude, min_params=params.min_params)
    # recurrent cells' W / R too: stored int8 beside the int8 activations, their float32 dequantized
    # values met the cell's float16 input and ONNX Runtime refused the type clash mid-run
    layers += [layer for layer in weight_only.recurrent_layers(model, {layer.weight for layer in layers})
               if layer.params >= params.min_params and graph.selected(layer, params.include, params.exclude)]
    half = [layer.weight for layer in layers if inits[layer.weight].data_type == onnx.TensorProto.FLOAT16]
    if half:
        why = (f"int8 activations need a float32 model; its weights are float16 ({half[0]}"
               f"{f' and {len(half) - 1} more' if len(half) > 1 else ''}): quantize the float32 model, or "
               "leave activations out (weight-only int8 / int4 keeps float16 compute)")
        raise RecipeError(why, [{"loc": ["activations"], "msg": why}])


def run(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    if params.max_output_error is not None:
        # the most sensitive layers move to higher precision until the output error bound holds
        from worker.pipeline.quantize.mixed_precision import run_bounded
        return run_bounded(model, params, ctx, run_once)
    return run_once(model, params, ctx)


def run_once(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    if params.activations is not None:
        if params.activations.calibration == "dynamic":
            from worker.pipeline.quantize.dynamic import quantize_dynamic
            return quantize_dynamic(model, params, ctx)
        from worker.pipeline.quantize.static import quantize_static
        return quantize_static(model, params, ctx)
    if params.weights.bits == 1:
        from worker.pipeline.quantize.sign import quantize_sign
        return quantize_sign(model, params, ctx)
    result = weight_only.quantize_weights(model, params, ctx)
    _quantize_tables(result, params, ctx)
    return result


def _quantize_tables(result: StepResult, params: QuantizeStep, ctx: StepContext) -> None:
    """Weight-only: the recipe's float tables (``static.table_tensors``) int8 per tensor, each with
    its layer record (bits, grid, SQNR) like every quantized weight."""
    from worker.pipeline.quantize.static import quantize_table, table_tensors

    tables = table_tensors(result.model, params)
    for layer in tables:
        before = graph.get_array(result.model, layer.weight).astype(np.float32)
        grid = quantize_table(result.model, layer)
        q_name = next(node.input[0] for node in result.model.graph.node
                      if node.op_type == "DequantizeLinear" and node.output[0] == layer.weight)
        q = graph.get_array(result.model, q_name)
        record = ctx.layers.get(layer.weight) or LayerRecord(layer.weight, layer.node, layer.op)
        record.bits = 8
        record.grid = {"scale": grid.scale, "zero_point": grid.zero_point, "axis": None, "block_size": None,
                       "bits": 8, "signed": True}
        record.extra.update({"sqnr_db": metrics.sqnr_db(before, q.astype(np.float32) * grid.scale),
                             "granularity": "tensor", "symmetric": True, "format": "qdq",
                             "activations": "weight-only int8 (table)"})
        ctx.layers[layer.weight] = record
    if tables:
        graph.sort_graph(result.model)
        result.metrics["quantized_tables"] = [layer.weight for layer in tables]
