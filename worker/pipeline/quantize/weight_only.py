"""Weight-only quantization: int8 / int4 / int2 weights, per tensor, output channel or block,
symmetric or asymmetric, chosen by RTN (nearest, or learned rounding: ``adaround``) or GPTQ, stored as DequantizeLinear feeding the layer (or,
for MatMul, as com.microsoft MatMulNBits where that runs faster on the target).

Numbers (docs/recipes.md), computed by ``kernels``:
    q  = clamp(round_half_to_even(w / s) + z, qmin, qmax)        w' = (q - z) * s
    symmetric:  signed q, z = 0, s = absmax / qmax (scale_search absmax; mse searches the clip)
    asymmetric: unsigned q, s, z from [min(w, 0), max(w, 0)] (minmax; mse searches the clip)
Per channel: one (s, z) along the weight's output axis; per block: along its input axis, in blocks
of ``block_size`` (ONNX blocked DequantizeLinear, opset 21). The DequantizeLinear output takes the
weight's name, so every reader of the weight (two MatMuls sharing it, a subgraph of If / Loop)
reads the dequantized tensor without being rewritten.

Storage types: INT8 / UINT8; INT4 / UINT4 (opset 21); INT2 / UINT2 (opset 25); ONNX packs the
sub-byte types two (four) to a byte, first element in the low bits.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

import kernels
from core.errors import PipelineError, RecipeError
from core.recipe import QuantizeStep, WeightQuantSpec
from worker.pipeline import graph, metrics, sessions, shape_inference, subgraphs
from worker.pipeline.data import bind, generated
from worker.pipeline.quantize import adaround, awq, gptq, lift_constants, matmulnbits
from worker.pipeline.quantize.grid import Grid, base_method, dequantize, grid_for, quantize_rtn
from worker.pipeline.records import sparsity_of
from worker.pipeline.step import LayerRecord, StepContext, StepResult

LAYER_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")

_STORAGE = {
    (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
    (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
    (2, True): onnx.TensorProto.INT2, (2, False): onnx.TensorProto.UINT2,
}


FLOAT16_SCALE_OPSET = 19


def required_opset(spec: WeightQuantSpec) -> int:
    """The lowest default-domain opset whose DequantizeLinear takes this storage and layout."""
    if spec.bits <= 2:
        return 25
    if spec.bits == 4 or spec.granularity == "block":
        return 21
    if spec.granularity == "channel":
        return 13
    return 10


def storage_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """An initializer of the ONNX integer type for ``bits`` holding ``values`` (packed below 8 bits)."""
    data_type = _STORAGE[(bits, signed)]
    values = np.ascontiguousarray(values)
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    packed = kernels.pack(values.reshape(-1).astype(np.int8 if signed else np.uint8), bits)
    return helper.make_tensor(name, data_type, list(values.shape), vals=packed.tobytes(), raw=True)


# ---------------------------------------------------------------------------- selection


def candidate_layers(model: onnx.ModelProto, params: QuantizeStep) -> list[graph.WeightLayer]:
    """The weights this step would quantize: initializers and weight-carrying Constant nodes of
    MatMul / Gemm / Conv / ConvTranspose (and Gather tables when ``embeddings``), filtered by the
    recipe's include / exclude / min_params."""
    ops = LAYER_OPS + (("Gather",) if params.embeddings else ())
    found = graph.weight_layers(model, ops=ops, include=params.include, exclude=params.exclude,
                                min_params=params.min_params)
    seen = {layer.weight for layer in found}
    found += [layer for layer in recurrent_layers(model, seen)
              if layer.params >= params.min_params and graph.selected(layer, params.include, params.exclude)]
    seen = {layer.weight for layer in found}
    found += graph.body_layers(model, ops + RECURRENT_OPS, seen, include=params.include, exclude=params.exclude,
                               min_params=params.min_params)
    consumers = graph.consumers(model)
    for node in lift_constants.constant_weights(model):
        name = node.output[0]
        if name in seen:
            continue
        tensor = node.attribute[0].t
        for consumer, index in consumers.get(name, []):
            if consumer.op_type not in ops:
                continue
            axes = graph._weight_axes(consumer, index, len(tensor.dims))
            if axes is None:
                continue
            layer = graph.WeightLayer(name, consumer.name, consumer.op_type, tuple(tensor.dims), *axes)
            if layer.params >= params.min_params and graph.selected(layer, params.include, params.exclude):
                found.append(layer)
                seen.add(name)
            break
    return found


def recurrent_layers(model: onnx.ModelProto, taken: set[str]) -> list[graph.WeightLayer]:
    """W and R of LSTM / GRU / RNN ([directions, gates * hidden, inputs]): one scale per gate row
    (axis 1), blocks along the inputs (axis 2). ONNX Runtime runs the cells on DequantizeLinear
    outputs as on initializers."""
    inits = graph.initializers(model)
    found = []
    for node in model.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        for index in (1, 2):
            name = node.input[index] if len(node.input) > index else ""
            tensor = inits.get(name)
            if tensor is None or name in taken or len(tensor.dims) != 3 or tensor.data_type not in (
                    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                continue
            found.append(graph.WeightLayer(name, node.name, node.op_type, tuple(tensor.dims), 1, 2))
            taken = taken | {name}
    return found


def refuse_empty_selection(model: onnx.ModelProto, params: QuantizeStep) -> None:
    """RecipeError at the selecting field when no weight matches (a recipe that cannot apply)."""
    if candidate_layers(model, params):
        return
    if params.include:
        loc, why = ["include"], f"no weight matches include {list(params.include)}"
    elif params.exclude:
        loc, why = ["exclude"], "exclude leaves no weight to quantize"
    else:
        loc, why = ["min_params"], (f"no MatMul / Gemm / Conv / Gather weight has {params.min_params} or more elements"
                                    + graph.unreadable_note(model, params.min_params))
    raise RecipeError(why, [{"loc": loc, "msg": why}])


def skipped_weights(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Float weights still inside If / Loop / Scan bodies (``subgraphs.hoist_weights`` leaves a name
    that would collide with another): left float, and listed with the reason."""
    skipped = []
    for node in model.graph.node:
        for sub in subgraphs.bodies(node):
            for tensor in sub.initializer:
                if tensor.data_type in subgraphs.FLOAT_TYPES and len(tensor.dims) >= 2:
                    skipped.append({"name": tensor.name, "node": node.name,
                                    "reason": f"weight inside a {node.op_type} subgraph stays float "
                                              "(its name is taken in the outer scope)"})
    return skipped


# ---------------------------------------------------------------------------- rewriting


def _drop_initializer(model: onnx.ModelProto, name: str) -> None:
    """Remove one initializer (and its graph-input entry, which old models list) by index: no
    other tensor is copied, so replacing n weights one by one stays linear."""
    for field in (model.graph.initializer, model.graph.input):
        for index, value in enumerate(field):
            if value.name == name:
                del field[index]
                break


def replace_with_dequantize(model: onnx.ModelProto, layer: graph.WeightLayer, q: np.ndarray, scale: np.ndarray,
                            zero_point: np.ndarray, grid: Grid, float_type: int) -> list[str]:
    """Swap the float initializer ``layer.weight`` for (q, scale[, zero point]) and a
    DequantizeLinear whose output carries the weight's old name. Returns the new names."""
    base = layer.weight
    q_name = graph.unique_name(model, f"{base}_quantized")
    s_name = graph.unique_name(model, f"{base}_scale")
    scale_dtype = np.float16 if float_type == onnx.TensorProto.FLOAT16 else np.float32
    new = [storage_tensor(q_name, q, grid.bits, grid.signed),
           numpy_helper.from_array(np.asarray(scale, dtype=scale_dtype), s_name)]
    inputs = [q_name, s_name]
    if not grid.symmetric:
        z_name = graph.unique_name(model, f"{base}_zero_point")
        new.append(storage_tensor(z_name, np.asarray(zero_point), grid.bits, grid.signed))
        inputs.append(z_name)
    attrs: dict[str, Any] = {}
    if grid.axis is not None:
        attrs["axis"] = grid.axis
    if grid.block_size is not None:
        attrs["block_size"] = grid.block_size
    node = helper.make_node("DequantizeLinear", inputs, [base], name=graph.unique_name(model, f"{base}_DequantizeLinear"),
                            **attrs)
    _drop_initializer(model, base)
    model.graph.initializer.extend(new)
    model.graph.node.insert(0, node)
    return [q_name, s_name, node.name]


def record_layer(ctx: StepContext, layer: graph.WeightLayer, grid: Grid, w_hat: np.ndarray, w_now: np.ndarray,
                 scale: np.ndarray, zero_point: np.ndarray, **extra: Any) -> LayerRecord:
    """Update (or start) the layer's record: bits, grid, and SQNR against the original weight."""
    record = ctx.layers.get(layer.weight) or LayerRecord(layer.weight, layer.node, layer.op)
    record.bits = grid.bits
    record.grid = {**grid.as_dict(), "scale": scale, "zero_point": zero_point}
    try:
        reference = graph.get_array(ctx.original, layer.weight).astype(np.float32)
    except KeyError:          # a lifted Constant or a weight an earlier step created
        reference = w_now
    if reference.shape != w_hat.shape:
        reference = w_now
    record.extra["sqnr_db"] = metrics.sqnr_db(reference, w_hat)
    # the stored weight's zeros: a 2- or 4-bit grid rounds a share of every layer to zero (60 % of
    # an int4 GPTQ layer was, and the report said 0)
    record.sparsity = sparsity_of(w_hat)
    record.extra["granularity"] = "tensor" if grid.axis is None else ("block" if grid.block_size else "channel")
    record.extra["symmetric"] = grid.symmetric
    if grid.block_size:
        record.extra["block_size"] = grid.block_size
    record.extra.update(extra)
    ctx.layers[layer.weight] = record
    return record



def raise_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``graph.ensure_opset`` run on the graph's structure only: ONNX's version converter copies
    the whole model several times over, so the large initializers sit out the conversion (as graph
    inputs of the same type) and are moved into the converted model afterwards, one at a time."""
    if graph.opset(model) >= version:
        return model
    shell = shape_inference.skeleton(model)
    kept = {t.name for t in shell.graph.initializer}
    moved = {t.name for t in model.graph.initializer if t.name not in kept}
    converted = graph.ensure_opset(shell, version)
    del shell
    stand_ins = moved - {v.name for v in model.graph.input}
    inputs = [v for v in converted.graph.input if v.name not in stand_ins]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    for tensor in model.graph.initializer:
        if tensor.name in moved:
            converted.graph.initializer.append(tensor)
            tensor.Clear()          # the copy now lives in ``converted``; free this one at once
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(converted, field, getattr(model, field))
    converted.metadata_props.extend(model.metadata_props)
    return converted


def prepare(model: onnx.ModelProto, params: QuantizeStep, opset: int) -> tuple[onnx.ModelProto, list[str]]:
    """Lift Constant weights, move If / Loop / Scan body weights to the main graph (where the
    DequantizeLinear that replaces them can live), raise the opset; returns the model to work on and
    the lifted names."""
    lifted = lift_constants.lift_constant_weights(model)
    subgraphs.hoist_weights(model)
    inits = graph.initializers(model)
    if any(inits[layer.weight].data_type == onnx.TensorProto.FLOAT16 for layer in candidate_layers(model, params)):
        # a float16 weight dequantizes to float16, so its scale is float16: DequantizeLinear
        # takes a float16 scale from opset 19 (13 allows float32 only)
        opset = max(opset, FLOAT16_SCALE_OPSET)
    try:
        model = raise_opset(model, opset)
    except Exception as exc:   # the version converter refuses some old graphs
        raise PipelineError(f"cannot raise the model's opset to {opset} (needed for {params.weights.bits}-bit "
                            f"{params.weights.granularity} weights): {exc}") from exc
    return model, lifted


def quantize_weights(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    """Weight-only quantization (RTN or GPTQ) of every selected weight; see the module docstring."""
    spec = params.weights
    model, lifted = prepare(model, params, required_opset(spec))
    layers = candidate_layers(model, params)
    runner = None
    solved: dict[str, tuple] = {}
    use_awq = params.awq
    if params.method == "gptq" or use_awq or spec.scale_search == "output" or spec.rounding == "adaround":
        # calibrated: each layer on the Hessian of the inputs it sees with the layers before it quantized
        rounding = "gptq" if params.method == "gptq" else spec.rounding
        runner = gptq.GptqRunner(model, layers, ctx, rounding=rounding, use_awq=use_awq)
        solved = runner.quantize_all(layers, lambda layer: grid_for(layer, spec))
    inits = graph.initializers(model)
    changed: list[str] = []
    packs: list[tuple[matmulnbits.Packed, int]] = []
    fallback: dict[str, str] = {}
    for position, layer in enumerate(layers):
        ctx.check_cancelled()
        tensor = inits[layer.weight]
        float_type = tensor.data_type
        w = numpy_helper.to_array(tensor).astype(np.float32)
        grid = grid_for(layer, spec)
        extra: dict[str, Any] = {"scale_search": grid.method}
        if layer.weight in solved:
            q, scale, zero_point, w_hat, w = solved.pop(layer.weight)   # w: the float weight before GPTQ
            w = w.astype(np.float32)
            method = params.method
            if layer.weight in runner.rounding_info:
                extra["rounding"] = adaround.record(runner.rounding_info[layer.weight])
            if layer.weight in runner.input_scales:
                source = runner.input_scales[layer.weight][0]
                extra["awq_alpha"] = runner.awq_alpha[source]
                w_hat = runner.effective(layer, w_hat)       # what the layer computes, after the 1/s
        else:
            if grid.method == "output":      # a layer the runner could not take: its starting grid
                grid = replace(grid, method=base_method(grid))
                extra["scale_search"] = grid.method
            q, scale, zero_point = quantize_rtn(w, grid)
            w_hat = dequantize(q, scale, zero_point, grid)
            method = "rtn"
            if runner is not None:
                fallback[layer.weight] = runner.fallback.get(layer.weight, "no GPTQ form")
        changed += replace_with_dequantize(model, layer, q, scale, zero_point, grid, float_type)
        record_layer(ctx, layer, grid, w_hat, w, scale, zero_point, format="qdq", method=method, **extra)
        packed = matmulnbits.from_grid(layer.weight, q, scale, zero_point, bits=grid.bits, signed=grid.signed,
                                       symmetric=grid.symmetric, axis=grid.axis,
                                       block_size=grid.block_size) if layer.op == "MatMul" else None
        if packed is not None:
            packs.append((packed, float_type))
        ctx.progress(0.9 * (position + 1) / max(len(layers), 1), f"quantized {layer.weight}")
    awq_inputs = _divide_awq_inputs(model, runner, layers) if runner is not None else {}
    graph.sort_graph(model)
    model, formats, timing = choose_format(model, params, layers, packs, ctx)
    for weight, chosen in formats.items():
        ctx.layers[weight].extra["format"] = chosen
    metrics_out: dict[str, Any] = {
        "mode": "weight_only", "bits": spec.bits, "granularity": spec.granularity, "symmetric": spec.symmetric,
        "block_size": spec.block_size, "method": params.method, "quantized": len(layers),
        "lifted_constants": lifted, "formats": formats, "opset": graph.opset(model),
        "skipped": skipped_weights(model),
    }
    if timing:
        metrics_out["format_latency_ms"] = timing
        for weight, measured in timing.items():
            ctx.layers[weight].extra["format_latency_ms"] = measured
    if fallback:
        metrics_out["rtn_fallback"] = fallback
    if runner is not None and use_awq:
        metrics_out["awq"] = {"alpha": dict(runner.awq_alpha), "scaled_inputs": awq_inputs}
    if runner is not None and getattr(runner, "propagation", None):
        metrics_out["propagation"] = runner.propagation
    return StepResult(model, changed, metrics_out)


def _divide_awq_inputs(model: onnx.ModelProto, runner: gptq.GptqRunner,
                      layers: list[graph.WeightLayer]) -> dict[str, str]:
    """AWQ's ``X / s`` in front of each scaled group (``quantize.awq.divide_inputs``); returns
    input tensor -> where the division went (``folded`` into its producer, or a ``Mul``)."""
    nodes = {node.name: node for node in model.graph.node}
    groups: dict[str, tuple[list[onnx.NodeProto], list[str], np.ndarray]] = {}
    for layer in layers:
        if layer.weight in runner.input_scales:
            source, s = runner.input_scales[layer.weight]
            found = groups.setdefault(source, ([], [], s))
            found[0].append(nodes[layer.node])
            found[1].append(layer.weight)
    placed = {}
    for source, (group_nodes, weights, s) in groups.items():
        count = len(model.graph.node)
        awq.divide_inputs(model, source, group_nodes, weights, s)
        placed[source] = "Mul" if len(model.graph.node) > count else "folded"
    return placed


def choose_format(model: onnx.ModelProto, params: QuantizeStep, layers: list[graph.WeightLayer],
                  packs: list[tuple[matmulnbits.Packed, int]], ctx: StepContext
                  ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, dict[str, float]]]:
    """DequantizeLinear + MatMul or MatMulNBits for each MatMul weight: as the recipe says, or
    (``auto``) whichever form of that layer runs faster on the target, measured here with the
    input shape the layer sees on the data (one measurement per layer shape)."""
    formats = {layer.weight: "qdq" for layer in layers}
    eligible = [(p, t) for p, t in packs if matmulnbits.eligible(model, p)]
    if not eligible or params.format == "qdq":
        return model, formats, {}
    timing: dict[str, dict[str, float]] = {}
    chosen = {packed.weight: "matmulnbits" for packed, _ in eligible}
    if params.format == "auto":
        dataset = bind(model, ctx.calibration) if ctx.calibration is not None else generated(model, count=1)
        feeds = next(dataset.head(1).batches(1))
        shapes = shape_inference.inferred_shapes(model, {name: value.shape for name, value in feeds.items()})
        readers = graph.consumers(model)
        provider = sessions.provider_for(ctx.target)
        rng = np.random.default_rng(0)
        measured: dict[tuple, tuple[str, dict[str, float]]] = {}
        for packed, float_type in eligible:
            ctx.check_cancelled()
            a_shape = shapes.get(readers[packed.weight][0][0].input[0]) or (1, packed.q.shape[0])
            lead = tuple(int(d) for d in a_shape[:-1]) or (1,)
            key = (packed.q.shape, packed.bits, packed.block_size, packed.symmetric, float_type, lead)
            if key not in measured:
                qdq, fused = matmulnbits.layer_models(model, packed, float_type, lead)
                dtype = np.float16 if float_type == onnx.TensorProto.FLOAT16 else np.float32
                a = rng.standard_normal((*lead, packed.q.shape[0])).astype(dtype)
                measured[key] = matmulnbits.choose(qdq, fused, {"A": a}, provider,
                                                   runs=int(ctx.options.get("format_runs", 20)),
                                                   budget_s=float(ctx.options.get("format_budget_s", 1.0)))
            chosen[packed.weight], timing[packed.weight] = measured[key]
    for packed, float_type in eligible:
        if chosen[packed.weight] == "matmulnbits":
            matmulnbits.to_matmulnbits(model, packed, float_type)
            formats[packed.weight] = "matmulnbits"
    graph.sort_graph(model)
    return model, formats, timing
