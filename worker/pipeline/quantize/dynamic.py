"""Dynamic int8 quantization: MatMul / Gemm weights stored int8, activations quantized at run time.

Each selected MatMul (with its bias Add, where the bias is a 1-D initializer that the MatMul's output
is the only input of) and each Gemm (transA 0, alpha 1, beta 1) becomes one com.microsoft
``DynamicQuantizeMatMul(A, B_int8, b_scale, b_zero_point, bias)``: ONNX Runtime quantizes A to
uint8 per call (its own min/max, asymmetric), multiplies in integers, and rescales to float.

Numbers (docs/recipes.md, computed by ``kernels``): B is int8, symmetric, one scale per output
channel, s = absmax / 127, q = clamp(rne(w / s), -128, 127) (per tensor when the recipe says
granularity: tensor). B is stored [K, N] as the op wants it (a Gemm's transB weight transposed);
the LayerRecord's grid is along the original weight's output axis.

Why this form: the standard-domain chain ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul
(-> Add)`` is what ONNX Runtime fuses into this very op at load time; emitting the fused op directly
runs the same kernel without depending on the fusion pattern matching (per-channel scales and biases
are where pattern matchers give up). ``bench.quality`` measures it against ORT's quantize_dynamic.

Two exact rewrites make the result faster and compute the same values (each module says how):
``attention_layout`` splits a packed QKV projection into column thirds read in sequence-major layout
by FusedMatMul (no Split, no head transposes), and ``shared_quantization`` quantizes a tensor that
several of these ops read once (DynamicQuantizeLinear + MatMulIntegerToFloat). ``ctx.options
["dynamic_layout_rewrites"] = False`` leaves both out (bench.quality's ``-plain`` rows).

Embedding tables (Gather over a weight, when the recipe's ``embeddings`` is on) become int8 per row,
dequantized after the Gather (``static.quantize_embedding``); large float tables that are only sliced
or added (learned positions) int8 per tensor (``static.quantize_table``). Conv computes in float
(ConvInteger is slower than float Conv on CPU), but its weights are stored int8 weight-only (per
output channel, symmetric, DequantizeLinear; ``finalize`` writes it in the form ONNX Runtime folds at
load): on the digits CNN the file goes from 2.86x to 3.8x smaller at the float Conv's speed. Weights
with other readers than MatMul / Gemm (or Conv) keep their float copy for those readers. Recurrent
cells' W / R (LSTM / GRU / RNN: ONNX Runtime runs them in float) and every layer inside an If / Loop /
Scan body (weights lifted and hoisted to the main graph, ``lift_constants``) are stored int8 the same
way, one scale per gate row / output channel: a model such as silero-vad, whose only layers are
Convs and an LSTM inside an If, is quantized rather than refused for having no MatMul.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

import kernels
from core.errors import RecipeError
from core.recipe import QuantizeStep
from worker.pipeline import graph, subgraphs
from worker.pipeline.quantize import lift_constants, int8_storage, weight_only
from worker.pipeline.quantize.attention_layout import fuse_attention_heads
from worker.pipeline.quantize.grid import Grid, dequantize, quantize_rtn
from worker.pipeline.quantize.shared_quantization import share_input_quantization
from worker.pipeline.quantize.static import (add_initializer, embedding_layers, quantize_embedding, quantize_table,
                                          table_tensors)
from worker.pipeline.step import LayerRecord, StepContext, StepResult

DYNAMIC_OPS = ("MatMul", "Gemm")
WEIGHT_ONLY_OPS = ("Conv",)      # float compute, int8 storage
PER_AXIS_DEQUANTIZE_OPSET = 13
MS_DOMAIN = "com.microsoft"


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    lift_constants.lift_constant_weights(prepared)
    lift_constants.lift_biases(prepared)
    subgraphs.hoist_weights(prepared)
    graph.ensure_node_names(prepared)
    return prepared


def _eligible(node: onnx.NodeProto, layer: graph.WeightLayer, inits: dict) -> bool:
    if len(layer.shape) != 2 or inits[layer.weight].data_type != onnx.TensorProto.FLOAT:
        return False
    if node.op_type == "Gemm":
        if graph.attribute(node, "transA", 0) or graph.attribute(node, "alpha", 1.0) != 1.0:
            return False
        if len(node.input) > 2 and node.input[2]:
            bias = inits.get(node.input[2])
            if bias is None or len(bias.dims) != 1 or graph.attribute(node, "beta", 1.0) != 1.0:
                return False
    return True


def selected_layers(model: onnx.ModelProto, params: QuantizeStep) -> list[graph.WeightLayer]:
    """MatMul / Gemm weights the recipe selects that the fused op can take."""
    inits = graph.initializers(model)
    nodes = {node.name: node for node in model.graph.node}
    return [layer for layer in graph.weight_layers(model, ops=DYNAMIC_OPS, include=params.include,
                                                   exclude=params.exclude, min_params=params.min_params)
            if _eligible(nodes[layer.node], layer, inits)]


def check(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> None:
    """Refuse, before any work, a dynamic quantize step that cannot apply."""
    if params.weights is not None and (params.weights.granularity == "block" or not params.weights.symmetric):
        loc = ["weights", "granularity"] if params.weights.granularity == "block" else ["weights", "symmetric"]
        why = "dynamic int8 takes symmetric per-tensor or per-channel int8 weights"
        raise RecipeError(why, [{"loc": loc, "msg": why}])
    prepared = _prepared(model)
    if not selected_layers(prepared, params) and not _weight_only_candidates(prepared, params):
        nodes = {node.name: node for node in prepared.graph.node}
        unfit = [f"{layer.weight} ({nodes[layer.node].op_type} {list(layer.shape)})"
                 for layer in graph.weight_layers(prepared, ops=DYNAMIC_OPS, include=params.include,
                                                  exclude=params.exclude, min_params=params.min_params)]
        if unfit:
            # selected, but not in a form the fused integer op takes: say so, not "no weight"
            why = (f"dynamic int8 takes 2-D float32 MatMul / Gemm weights (Gemm without transA, alpha 1, a 1-D "
                   f"bias at beta 1); none of the {len(unfit)} selected is: {', '.join(unfit[:3])}; static int8 "
                   "(calibration: percentile) takes them")
            raise RecipeError(why, [{"loc": ["activations", "calibration"], "msg": why}])
        if graph.weight_layers(prepared, ops=WEIGHT_ONLY_OPS, include=params.include, exclude=params.exclude,
                               min_params=params.min_params):
            why = ("dynamic int8 quantizes the activations of MatMul / Gemm layers and this selection has only "
                   "Conv weights (ONNX Runtime runs Conv in float here): static int8 (calibration: percentile, with "
                   "calibration data) quantizes them, or leave activations out for weight-only int8")
            raise RecipeError(why, [{"loc": ["activations", "calibration"], "msg": why}])
        if params.include:
            loc, why = ["include"], f"no MatMul / Gemm weight matches include {list(params.include)}"
        elif params.exclude:
            loc, why = ["exclude"], "exclude leaves no MatMul / Gemm weight to quantize"
        else:
            loc, why = ["min_params"], (f"no 2-D MatMul / Gemm or recurrent weight has {params.min_params} "
                                        "or more elements" + graph.unreadable_note(model, params.min_params))
        raise RecipeError(why, [{"loc": loc, "msg": why}])


def _bias_add(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict) -> tuple[onnx.NodeProto, str] | None:
    """The Add that adds a 1-D bias initializer to this MatMul's output, when it is the only reader."""
    readers = graph.consumers(model).get(node.output[0], [])
    if len(readers) != 1 or readers[0][0].op_type != "Add":
        return None
    add, index = readers[0]
    other = add.input[1 - index]
    if other in inits and len(inits[other].dims) == 1 and inits[other].data_type == onnx.TensorProto.FLOAT:
        return add, other
    return None


def quantize_dynamic(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    """Dynamic int8 (see the module docstring); records a LayerRecord per quantized weight."""
    check(model, params, ctx)
    quantized = _prepared(model)
    layers = selected_layers(quantized, params)
    # Exact layout rewrite of packed-QKV attention blocks (attention_layout) before quantizing: the
    # selected packed weight becomes three column-third weights, quantized like any other.
    # ctx.options["dynamic_layout_rewrites"] = False leaves both exact rewrites out (A/B benches).
    rewrites = ctx.options.get("dynamic_layout_rewrites", True)
    packed = {layer.weight: graph.get_array(quantized, layer.weight) for layer in layers} if rewrites else {}
    split = fuse_attention_heads(quantized, weights=set(packed)) if rewrites else {}
    split_from = {third: packed for packed, thirds in split.items() for third in thirds}
    if split:
        layers = _layers_after_split(quantized, layers, split)
    per_channel = params.weights is None or params.weights.granularity == "channel"
    inits = graph.initializers(quantized)
    nodes = {node.name: node for node in quantized.graph.node}
    # A weight shared by several MatMul / Gemm readers is quantized once, for all of them.
    storage: dict[tuple[str, bool], tuple[str, str, str]] = {}
    grids: dict[str, dict[str, Any]] = {}
    replaced = 0
    unsigned = int8_storage.unsigned_weights(ctx.target, ctx.options, params.integer_weights)
    for position, layer in enumerate(layers):
        ctx.check_cancelled()
        weight = graph.get_array(quantized, layer.weight).astype(np.float32)
        axis = layer.out_axis if per_channel else None
        # A third of a split packed weight keeps the packed tensor's grid: per channel its columns'
        # own scales anyway; per tensor the packed tensor's one scale (the unsplit numbers exactly).
        grid_of = packed[split_from[layer.weight]] if layer.weight in split_from and axis is None else weight
        scale, zero = kernels.choose_qparams(np.asarray(grid_of, np.float32), bits=8, symmetric=True, signed=True,
                                             axis=axis, method="absmax")
        q = kernels.quantize(np.ascontiguousarray(weight), scale, zero, bits=8, signed=True, axis=axis)
        grids[layer.weight] = {"scale": np.asarray(scale, np.float32), "zero_point": np.asarray(zero),
                               "axis": axis, "block_size": None, "bits": 8, "signed": True}
        readers = [(n, i) for n, i in graph.consumers(quantized).get(layer.weight, [])
                   if n.op_type in DYNAMIC_OPS and i == 1 and _eligible(n, layer, inits)]
        for node, _ in readers:
            transposed = node.op_type == "Gemm" and bool(graph.attribute(node, "transB", 0))
            key = (layer.weight, transposed)
            if key not in storage:
                # The op wants B as [K, N] with one scale per column N.
                stored, zero_point = int8_storage.stored(q.T if transposed else q, unsigned)
                names = tuple(graph.unique_name(quantized, f"{layer.weight}_{suffix}")
                              for suffix in ("quantized" + ("_t" if transposed else ""), "scale", "zero_point"))
                graph.set_array(quantized, names[0], np.ascontiguousarray(stored))
                add_initializer(quantized, names[1], np.asarray(scale, np.float32).reshape(-1 if per_channel else ()))
                add_initializer(quantized, names[2], np.full(stored.shape[1] if per_channel else (), zero_point,
                                                             stored.dtype))
                storage[key] = names
            q_name, s_name, z_name = storage[key]
            _replace(quantized, node, q_name, s_name, z_name, inits)
            replaced += 1
        ctx.progress((position + 1) / len(layers), f"dynamic int8 {layer.weight}")
    shared = share_input_quantization(quantized) if rewrites else 0
    convs = _conv_weights_int8(quantized, params, ctx, per_channel)
    cells = _recurrent_and_body_weights_int8(quantized, params, ctx, per_channel,
                                             {layer.weight for layer in layers + convs})
    embeddings = embedding_layers(quantized, params)
    for layer in embeddings:
        grid = quantize_embedding(quantized, layer)
        grids[layer.weight] = {"scale": grid.scale, "zero_point": grid.zero_point, "axis": 0,
                               "block_size": None, "bits": 8, "signed": True}
    tables = table_tensors(quantized, params)
    for layer in tables:
        grid = quantize_table(quantized, layer)
        grids[layer.weight] = {"scale": grid.scale, "zero_point": grid.zero_point, "axis": None,
                               "block_size": None, "bits": 8, "signed": True}
    embeddings += tables
    used = {name for node in quantized.graph.node for name in node.input} | subgraphs.subgraph_reads(quantized)
    unused = [t.name for t in quantized.graph.initializer if t.name not in used]
    graph.remove_initializers(quantized, unused)
    kept_inputs = [v for v in quantized.graph.input if v.name not in set(unused)]
    del quantized.graph.input[:]
    quantized.graph.input.extend(kept_inputs)
    graph.ensure_domain(quantized, MS_DOMAIN, 1)
    graph.sort_graph(quantized)
    graph.check_if_in_memory(quantized)

    for layer in layers + embeddings:
        record = ctx.layers.get(layer.weight) or LayerRecord(layer.weight, layer.node, layer.op)
        record.bits = 8
        record.grid = grids[layer.weight]
        if layer.op in DYNAMIC_OPS:
            record.extra["weight_storage"] = int8_storage.storage_name(unsigned)
        if layer.weight in split_from:
            record.extra["split_from"] = split_from[layer.weight]
        record.extra["activations"] = ("dynamic int8 (DynamicQuantizeMatMul)" if layer.op in DYNAMIC_OPS else
                                       "weight-only int8 rows (embedding)" if layer.op == "Gather" else
                                       "weight-only int8 (table)")
        ctx.layers[layer.weight] = record
    metrics = {"format": "DynamicQuantizeMatMul", "quantized_weights": len(layers), "layers_replaced": replaced,
               "conv_weights_int8": len(convs), "recurrent_and_body_weights_int8": len(cells),
               "quantized_embeddings": len(embeddings) - len(tables), "quantized_tables": len(tables),
               "per_channel": per_channel, "attention_blocks_relaid": len(split),
               "shared_input_quantizations": shared}
    return StepResult(quantized, [layer.weight for layer in layers + embeddings + convs + cells], metrics)


def _conv_weights_int8(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext,
                       per_channel: bool) -> list[graph.WeightLayer]:
    """Store the selected Conv weights int8 weight-only (see the module docstring): float Conv
    compute, the same grid as the MatMul weights. Left float: weights read by anything else than a
    Conv's weight input, and per-channel grids below opset 13 (per-axis DequantizeLinear)."""
    if per_channel and graph.opset(model) < PER_AXIS_DEQUANTIZE_OPSET:
        return []
    inits = graph.initializers(model)
    readers = graph.consumers(model)
    done = []
    for layer in graph.weight_layers(model, ops=WEIGHT_ONLY_OPS, include=params.include, exclude=params.exclude,
                                     min_params=params.min_params):
        tensor = inits.get(layer.weight)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or \
                any(node.op_type not in WEIGHT_ONLY_OPS or index != 1 for node, index in readers.get(layer.weight, [])):
            continue
        ctx.check_cancelled()
        grid = Grid(8, True, True, layer.out_axis if per_channel else None, None, "absmax")
        w = graph.get_array(model, layer.weight).astype(np.float32)
        q, scale, zero_point = quantize_rtn(np.ascontiguousarray(w), grid)
        weight_only.replace_with_dequantize(model, layer, q, scale, zero_point, grid, onnx.TensorProto.FLOAT)
        w_hat = dequantize(q, scale, zero_point, grid)
        weight_only.record_layer(ctx, layer, grid, w_hat, w, scale, zero_point,
                                 activations="float (Conv: weight-only int8; ONNX Runtime's ConvInteger is "
                                             "slower than float Conv on CPU)")
        done.append(layer)
    return done


def _weight_only_candidates(model: onnx.ModelProto, params: QuantizeStep,
                            taken: set[str] = frozenset()) -> list[graph.WeightLayer]:
    """What dynamic int8 stores weight-only besides MatMul / Gemm and main-graph Convs: recurrent
    cells' W / R and every layer inside an If / Loop / Scan body (reading a main-graph weight).
    (Main-graph Convs alone do not make a model dynamic int8 applies to: it would be weight-only.)"""
    recurrent = [layer for layer in weight_only.recurrent_layers(model, set(taken))
                 if layer.params >= params.min_params and graph.selected(layer, params.include, params.exclude)]
    taken = set(taken) | {layer.weight for layer in recurrent}
    return recurrent + graph.body_layers(model, DYNAMIC_OPS + WEIGHT_ONLY_OPS + weight_only.RECURRENT_OPS,
                                                 taken, include=params.include, exclude=params.exclude,
                                                 min_params=params.min_params)


def _recurrent_and_body_weights_int8(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext,
                                     per_channel: bool, taken: set[str]) -> list[graph.WeightLayer]:
    """Recurrent cells' W / R and layers inside bodies: int8 weight-only (float compute), the grid of
    ``_conv_weights_int8``; left float below opset 13 when per channel (per-axis DequantizeLinear)."""
    if per_channel and graph.opset(model) < PER_AXIS_DEQUANTIZE_OPSET:
        return []
    done = []
    for layer in _weight_only_candidates(model, params, taken):
        ctx.check_cancelled()
        tensor = graph.initializers(model).get(layer.weight)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        grid = Grid(8, True, True, layer.out_axis if per_channel else None, None, "absmax")
        w = graph.get_array(model, layer.weight).astype(np.float32)
        q, scale, zero_point = quantize_rtn(np.ascontiguousarray(w), grid)
        weight_only.replace_with_dequantize(model, layer, q, scale, zero_point, grid, onnx.TensorProto.FLOAT)
        weight_only.record_layer(ctx, layer, grid, dequantize(q, scale, zero_point, grid), w, scale, zero_point,
                                 activations="float (weight-only int8: recurrent cell or inside a control-flow body)")
        done.append(layer)
    return done


def _layers_after_split(model: onnx.ModelProto, layers: list[graph.WeightLayer],
                        split: dict[str, list[str]]) -> list[graph.WeightLayer]:
    """The selected layers with each split packed weight replaced, in place, by its three thirds (the
    recipe selected the packed weight; its parts inherit that, whatever their own size or names)."""
    by_weight = {layer.weight: layer for layer in graph.weight_layers(model, ops=DYNAMIC_OPS)}
    result = []
    for layer in layers:
        result.extend(by_weight[name] for name in split[layer.weight]) if layer.weight in split else result.append(layer)
    return result


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, q_name: str, s_name: str, z_name: str,
             inits: dict) -> None:
    """Swap ``node`` (MatMul [+ bias Add] or Gemm) for DynamicQuantizeMatMul, in place."""
    bias, output, drop = "", node.output[0], [node]
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
    else:
        found = _bias_add(model, node, inits)
        if found is not None:
            add, bias = found
            output = add.output[0]
            drop.append(add)
    fused = helper.make_node("DynamicQuantizeMatMul", [node.input[0], q_name, s_name, z_name, bias], [output],
                             name=node.name, domain=MS_DOMAIN)
    index = list(model.graph.node).index(node)
    for old in drop:
        model.graph.node.remove(old)
    model.graph.node.insert(index, fused)
