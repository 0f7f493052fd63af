"""Static int8 quantization of weights and activations, as QDQ (QuantizeLinear / DequantizeLinear
pairs) that ONNX Runtime fuses into integer kernels (QLinearConv, QLinearMatMul, QGemm,
MatMulIntegerToFloat).

Numbers (docs/recipes.md, computed by ``kernels``):
    weights      int8, symmetric, one scale per output channel (the layer's out_axis; per tensor
                 when the recipe says granularity: tensor): s = absmax / 127, q = clamp(rne(w / s))
    activations  one (s, z) per tensor from its calibrated range [lo, hi] (``calibrate``):
                 uint8 with s = (hi - lo) / 255 when asymmetric, int8 with s = absmax / 127 when symmetric
    bias         int32 with s_b = s_x * s_w (per output channel), z = 0, so the integer kernels add
                 it in the accumulator; kept float where it would overflow int32
    bias correction  b -= each layer's own mean output shift E[x'] W' - E[x] W, from its input's
                 means before and after its Q/DQ pair on the calibration data (``quantize.bias_correction``)

What gets Q/DQ:
- Conv / MatMul / Gemm whose weight the recipe selects (and MatMul of two activations, such as
  attention's Q K^T): every float activation input, and the output of a Conv (QLinearConv needs
  it). A ReLU that is its producer's only reader is folded into the producer's output quantization
  (asymmetric activations: the range starts at 0, so the zero point is qmin and QuantizeLinear's
  clamp *is* the ReLU).
- MaxPool / Flatten / Reshape / Transpose / Squeeze / Unsqueeze of a quantized tensor: the output
  takes the input's grid (same scale and zero point), which lets ONNX Runtime run them on int8.
- numerically sensitive ops (the recipe's ``float_ops``, by default Softmax, the normalizations,
  Erf, Exp, Log, Pow, Sqrt, ReduceMean) stay in float; one of ``SENSITIVE_OPS`` that the recipe
  drops from ``float_ops`` gets Q/DQ on its float inputs and output.
- a tensor whose calibration showed mask sentinels (``calibrate.MASK_MAGNITUDE``) stays float.
Recurrent cells (LSTM / GRU / RNN, in the main graph or an If / Loop body) keep float compute: their W
and R are int8 weight-only, one scale per gate row. Embedding tables (Gather over a weight, when the recipe's ``embeddings`` is on) are int8 per row,
dequantized after the Gather (``quantize_embedding``). Other float initializers as large as a weight
that are only sliced, reshaped or added (learned position tables) are int8 per tensor behind a
DequantizeLinear (``quantize_table``).
Elementwise Add / Mul (residuals, masks) are left in float between a DequantizeLinear and a
QuantizeLinear: cheap, and where residual streams keep their precision. A node that writes a model
output and is not quantized itself reads the float tensor (``_output_readers``). ConvTranspose weights
are int8 weight-only (``_weight_only_layers``).

Per-axis DequantizeLinear needs opset 13, so older models are upgraded first. A Conv followed by
BatchNormalization is folded before the weights are quantized: the grid must be chosen for the
weights that actually multiply.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

import kernels
from core.errors import PipelineError, RecipeError
from core.recipe import QuantizeStep
from worker.pipeline import activations, calibrate, graph, subgraphs
from worker.pipeline.metrics import sqnr_db
from worker.pipeline.data import DataError, Dataset, bind
from worker.pipeline.quantize import (adaround, conv_fusions, int8_storage, lift_constants, pair_saturation, tensorrt_qdq,
                                      weight_only, weight_only_compute, wide_activations)
from worker.pipeline.step import LayerRecord, StepContext, StepResult

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
SENSITIVE_OPS = ("Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                 "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Pow", "Sqrt", "ReduceMean")
MIN_OPSET = 13                       # per-axis DequantizeLinear
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class ActivationGrid:
    """One tensor's (scale, zero point) and the initializer names that hold them."""

    scale: float
    zero_point: int
    dtype: int            # onnx.TensorProto.UINT8 or INT8
    scale_name: str
    zero_point_name: str


@dataclass(frozen=True)
class WeightGrid:
    scale: np.ndarray      # float32: () per tensor or [channels]
    zero_point: np.ndarray
    axis: int | None


# ----------------------------------------------------------------------------------------- checks

def calibration_data(model: onnx.ModelProto, ctx: StepContext) -> Dataset:
    """The calibration data bound to ``model``; RecipeError when it is missing or does not fit."""
    if ctx.calibration is None:
        why = "static activation quantization needs calibration data (or calibration: dynamic)"
        raise RecipeError(why, [{"loc": ["activations", "calibration"], "msg": why}])
    try:
        return bind(model, ctx.calibration)
    except DataError as error:
        raise RecipeError(f"calibration data: {error}", [{"loc": ["calibration", *error.path], "msg": str(error)}])


def check(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> None:
    """Refuse, before any work, a static quantize step that cannot apply."""
    if params.weights is not None and params.weights.granularity == "block":
        why = "static int8 takes per-tensor or per-channel weights (integer kernels have no blocks)"
        raise RecipeError(why, [{"loc": ["weights", "granularity"], "msg": why}])
    if params.activations.calibration not in calibrate.METHODS:
        why = f"static calibration is one of {calibrate.METHODS}"
        raise RecipeError(why, [{"loc": ["activations", "calibration"], "msg": why}])
    calibration_data(model, ctx)
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    lift_constants.lift_constant_weights(prepared)
    subgraphs.hoist_weights(prepared)
    if not selected_layers(prepared, params) and not _weight_only_layers(prepared, params, set()):
        if params.include:
            loc, why = ["include"], f"no Conv / MatMul / Gemm weight matches include {list(params.include)}"
        elif params.exclude:
            loc, why = ["exclude"], "exclude leaves no Conv / MatMul / Gemm weight to quantize"
        else:
            loc, why = ["min_params"], (f"no Conv / MatMul / Gemm weight has {params.min_params} or more elements"
                                        + graph.unreadable_note(prepared, params.min_params))
        raise RecipeError(why, [{"loc": loc, "msg": why}])


def _weight_only_layers(model: onnx.ModelProto, params: QuantizeStep, taken: set[str]) -> list[graph.WeightLayer]:
    """Weights static int8 stores int8 without quantizing the activations around them: recurrent
    cells' W / R (main graph), ConvTranspose (a U-Net's upsampling: ONNX Runtime's CPU provider has
    no integer ConvTranspose to fuse QDQ into, so it runs in float on the dequantized weight; it was
    left float32 and unlisted) and every layer inside an If / Loop / Scan body (hoisted weights)."""
    recurrent = [layer for layer in weight_only.recurrent_layers(model, taken)
                 if layer.params >= params.min_params and graph.selected(layer, params.include, params.exclude)]
    transposed = [layer for layer in graph.weight_layers(model, ops=("ConvTranspose",), include=params.include,
                                                         exclude=params.exclude, min_params=params.min_params)
                  if layer.weight not in taken and "ConvTranspose" not in params.float_ops]
    chosen = recurrent + transposed
    return chosen + graph.body_layers(model, COMPUTE_OPS + weight_only.RECURRENT_OPS,
                                      taken | {layer.weight for layer in chosen}, include=params.include,
                                      exclude=params.exclude, min_params=params.min_params)


def selected_layers(model: onnx.ModelProto, params: QuantizeStep) -> list[graph.WeightLayer]:
    float_ops = set(params.float_ops)
    return [layer for layer in graph.weight_layers(model, ops=COMPUTE_OPS, include=params.include,
                                                   exclude=params.exclude, min_params=params.min_params)
            if layer.op not in float_ops]


# ------------------------------------------------------------------------------------- preparing

def prepare(model: onnx.ModelProto, fused: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy with weights as initializers, named nodes, opset >= 13, BatchNorm and per-channel
    Mul / Add folded into Conv, and hard-swish as one op (``conv_fusions``, opset 14 where it occurs)."""
    prepared = lift_constants.lifted_copy(model)
    lift_constants.lift_batchnorm_parameters(prepared)
    # Conv / Gemm biases in Constant nodes (paddle2onnx writes every one so) as initializers: bias
    # correction and the int32 bias (ONNX Runtime's QLinearConv fusion wants one) reach only those.
    # Left as Constants, the PP-OCR recognizer had 3 of its 18 layers corrected, the detector 6 of 19
    # (detector IoU 0.9842 -> 0.9877, output rel_l2 0.085 -> 0.069 once lifted)
    lift_constants.lift_biases(prepared)
    if graph.opset(prepared) < MIN_OPSET:
        try:
            prepared = graph.ensure_opset(prepared, MIN_OPSET)
        except Exception as error:   # the converter raises several types; all mean "cannot upgrade"
            raise PipelineError(f"cannot raise the model's opset to {MIN_OPSET} for per-channel QDQ: {error}") from error
    fold_batchnorm(prepared)
    affine = conv_fusions.fold_channel_affine(prepared)
    if graph.opset(prepared) < conv_fusions.HARD_SWISH_OPSET and conv_fusions.has_hard_swish(prepared):
        try:
            prepared = graph.ensure_opset(prepared, conv_fusions.HARD_SWISH_OPSET)
        except Exception:   # the converter raises several types; the elementwise form then stays
            pass
    hard_swish = conv_fusions.fuse_hard_swish(prepared)
    affine += conv_fusions.fold_input_affine(prepared)       # after the activations are whole ops
    if fused is not None:
        fused.update(affine_folded=len(affine), hard_swish_fused=len(hard_swish))
    return prepared


def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold inference-mode BatchNormalization into the Conv before it (the Conv's only reader):
    W' = W * g / sqrt(v + eps) per output channel, b' = (b - m) * g / sqrt(v + eps) + beta.
    Returns the folded BatchNormalization node names."""
    inits = graph.initializers(model)
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    folded = []
    for node in list(model.graph.node):
        if node.op_type != "BatchNormalization" or len(node.output) != 1:
            continue
        conv = graph.producers(model).get(node.input[0])
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        if len(readers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs:
            continue
        if not all(name in inits for name in node.input[1:5]):
            continue
        if len(readers.get(conv.input[1], [])) != 1:
            continue          # a weight another layer also reads cannot take this BN's factors
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:5])
        eps = graph.attribute(node, "epsilon", 1e-5)
        factor = gamma / np.sqrt(var + eps)
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        bias = np.zeros(weight.shape[0]) if len(conv.input) < 3 or not conv.input[2] else \
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
        graph.set_array(model, conv.input[1], (weight * factor.reshape(shape)).astype(np.float32))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] and \
            len(readers.get(conv.input[2], [])) == 1 else graph.unique_name(model, conv.input[1] + "_bias")
        graph.set_array(model, bias_name, ((bias - mean) * factor + beta).astype(np.float32))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        conv.output[0] = node.output[0]
        model.graph.node.remove(node)
        folded.append(node.name)
    if folded:
        used = {name for n in model.graph.node for name in n.input} | subgraphs.subgraph_reads(model)
        graph.remove_initializers(model, [t.name for t in model.graph.initializer if t.name not in used])
    return folded


# ------------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    """Which tensors get which grid, decided before the graph is touched."""

    compute_nodes: list[onnx.NodeProto]
    calibrated: dict[str, str]        # tensor to quantize -> tensor whose range it takes (itself, or a folded ReLU's output)
    relu_folds: dict[str, onnx.NodeProto]   # producer output -> the ReLU folded into its quantization
    inherits: dict[str, str]          # passthrough output -> the input whose grid it takes
    sensitive_nodes: list[onnx.NodeProto]


def _float_activation(name: str, inits: dict, types: dict[str, int]) -> bool:
    return bool(name) and name not in inits and types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's tensors, as ONNX's inference gives them (weights too: they are
    inputs of the skeleton). On ``shape_inference.skeleton``, which leaves the weights out: a tensor's
    type does not depend on a weight's values, and inference on the whole model serialized every
    weight into ONNX's C++ and back (0.1 to 0.3 CPU s of a BERT's static int8)."""
    from worker.pipeline.shape_inference import skeleton

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:   # inference is best effort: unknown tensors are assumed float
        inferred = model
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def _node_selected(node_name: str, params: QuantizeStep) -> bool:
    """include / exclude over a node's name, for layers that have no weight to match."""
    if params.include and not any(fnmatch.fnmatchcase(node_name, p) for p in params.include):
        return False
    return not any(fnmatch.fnmatchcase(node_name, p) for p in params.exclude)


def excluded_nodes(model: onnx.ModelProto, params: QuantizeStep) -> frozenset[str]:
    """Conv / MatMul / Gemm nodes that the recipe's include / exclude leave out (by the node's name or
    a weight's): they stay float, inputs included. Were they to read a quantized neighbour's
    DequantizeLinear output, they would take its rounding error while the user asked for float."""
    if not params.include and not params.exclude:
        return frozenset()
    inits = graph.initializers(model)
    found = set()
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weights = [name for name in node.input[1:2] if name in inits]
        names = [node.name] + weights
        if params.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in params.include):
            found.add(node.name)
        elif any(fnmatch.fnmatchcase(n, p) for n in names for p in params.exclude):
            found.add(node.name)
    return frozenset(found)


def _layer_output(node: onnx.NodeProto, readers: dict, inits: dict) -> str:
    """The tensor a layer's result ends in: a MatMul's bias Add (its only reader, adding a 1-D
    initializer) belongs to the layer."""
    out = node.output[0]
    found = readers.get(out, [])
    if node.op_type == "MatMul" and len(found) == 1 and found[0][0].op_type == "Add":
        add, index = found[0]
        other = add.input[1 - index]
        if other in inits and len(inits[other].dims) == 1:
            return add.output[0]
    return out


def _read_in_float_only(tensor: str, readers: dict, float_readers: frozenset[str]) -> bool:
    """Every reader of ``tensor``, or of the one ReLU that reads it, is a layer kept float."""
    found = [reader for reader, _ in readers.get(tensor, [])]
    if len(found) == 1 and found[0].op_type == "Relu":
        found = [reader for reader, _ in readers.get(found[0].output[0], [])]
    return bool(found) and all(reader.name in float_readers for reader in found)


def plan(model: onnx.ModelProto, params: QuantizeStep, layers: list[graph.WeightLayer],
         float_readers: frozenset[str] = frozenset()) -> Plan:
    inits = graph.initializers(model)
    types = _tensor_types(model)
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    float_ops = set(params.float_ops)
    weight_nodes = {layer.node for layer in layers}
    symmetric = params.activations.symmetric

    compute, sensitive = [], []
    calibrated: dict[str, str] = {}
    relu_folds: dict[str, onnx.NodeProto] = {}
    inherits: dict[str, str] = {}
    folded: set[str] = set()     # outputs of ReLUs folded into their producer's quantization
    for node in graph.topological_nodes(model):
        op = node.op_type
        if op in float_ops or node.domain not in ("", "ai.onnx"):
            continue
        is_activation_matmul = (op == "MatMul" and all(_float_activation(n, inits, types) for n in node.input)
                                and _node_selected(node.name, params))
        if op in COMPUTE_OPS and (node.name in weight_nodes or is_activation_matmul):
            compute.append(node)
            for name in node.input[:2]:
                if _float_activation(name, inits, types) and name not in calibrated and name not in inherits \
                        and name not in folded:
                    calibrated[name] = name
            out = _layer_output(node, readers, inits)
            relu = [reader for reader, _ in readers.get(out, [])]
            if _read_in_float_only(out, readers, float_readers):
                pass     # only excluded layers read it (directly or through a ReLU): no grid to take
            elif (len(relu) == 1 and relu[0].op_type == "Relu" and not symmetric and out not in outputs
                    and relu[0].output[0] not in outputs and "Relu" not in float_ops
                    and not any(r.name in float_readers for r, _ in readers.get(relu[0].output[0], []))):
                relu_folds[out] = relu[0]
                calibrated[out] = relu[0].output[0]
                folded.add(relu[0].output[0])
            elif op == "Conv" and out not in outputs:
                calibrated[out] = out
        elif op in PASSTHROUGH_OPS:
            source = node.input[0]
            if (source in calibrated or source in inherits or source in folded) and node.output[0] not in outputs:
                inherits[node.output[0]] = source
        elif op in SENSITIVE_OPS:
            sensitive.append(node)
            for name in list(node.input[:1]) + [node.output[0]]:
                if _float_activation(name, inits, types) and name not in outputs and name not in calibrated \
                        and name not in inherits and name not in folded:
                    calibrated[name] = name
    return Plan(compute, calibrated, relu_folds, inherits, sensitive)


# ---------------------------------------------------------------------------------------- grids

def add_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Append a new initializer keeping a 0-d array 0-d (a per-tensor scale / zero point must be a
    scalar; ``graph.set_array`` goes through np.ascontiguousarray, which makes it 1-D)."""
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))


def activation_grid(model: onnx.ModelProto, tensor: str, lo: float, hi: float, symmetric: bool) -> ActivationGrid:
    """(scale, zero point) for [lo, hi] by the contract's formula (kernels.choose_qparams), stored
    as two new scalar initializers."""
    bounds = np.array([lo, hi], dtype=np.float32)
    if symmetric:
        scale, zero = kernels.choose_qparams(bounds, bits=8, symmetric=True, signed=True, method="absmax")
        dtype, np_dtype = onnx.TensorProto.INT8, np.int8
    else:
        scale, zero = kernels.choose_qparams(bounds, bits=8, symmetric=False, signed=False, method="minmax")
        dtype, np_dtype = onnx.TensorProto.UINT8, np.uint8
    scale_name = graph.unique_name(model, f"{tensor}_scale")
    add_initializer(model, scale_name, np.asarray(scale, dtype=np.float32).reshape(()))
    zero_name = graph.unique_name(model, f"{tensor}_zero_point")
    add_initializer(model, zero_name, np.asarray(zero).astype(np_dtype).reshape(()))
    return ActivationGrid(float(np.asarray(scale)), int(np.asarray(zero)), dtype, scale_name, zero_name)


def weight_grid(weight: np.ndarray, layer: graph.WeightLayer, params: QuantizeStep) -> WeightGrid:
    spec = params.weights
    per_channel = spec is None or spec.granularity == "channel"
    symmetric = spec is None or spec.symmetric
    method = (spec.scale_search if spec is not None and spec.scale_search else
              ("absmax" if symmetric else "minmax"))
    axis = layer.out_axis if per_channel else None
    scale, zero = kernels.choose_qparams(weight, bits=8, symmetric=symmetric, signed=symmetric,
                                         axis=axis, method=method)
    return WeightGrid(np.asarray(scale, dtype=np.float32), np.asarray(zero), axis)


def quantize_weight(model: onnx.ModelProto, layer: graph.WeightLayer, params: QuantizeStep,
                    unsigned_storage: bool = False, rounded: np.ndarray | None = None,
                    sqnr: dict[str, float] | None = None) -> WeightGrid:
    """Replace the float weight by int8 + DequantizeLinear whose output keeps the weight's name, so
    every reader (a shared weight's second layer too) reads the dequantized tensor unchanged.
    ``unsigned_storage``: symmetric int8 values stored as uint8 + 128 (``int8_storage``).
    ``rounded``: the integers learned on the same grid (``weights.rounding: adaround``), else nearest.
    ``sqnr``: gets the weight's SQNR against the weight quantized here, which SmoothQuant, CLE or a
    folded BatchNorm made from the original (against the original it read -3 to -16 dB)."""
    weight = graph.get_array(model, layer.weight).astype(np.float32, copy=False)
    grid = weight_grid(weight, layer, params)
    signed = params.weights is None or params.weights.symmetric
    if rounded is not None and rounded.shape == weight.shape:
        q = rounded
    else:
        q = kernels.quantize(np.ascontiguousarray(weight), grid.scale, grid.zero_point, bits=8, signed=signed,
                             axis=grid.axis)
    if signed and unsigned_storage:
        q, shift = int8_storage.stored(q, unsigned=True)
        zero_point = np.full(np.shape(grid.zero_point), shift, np.uint8)
    else:
        np_dtype = np.int8 if signed else np.uint8
        q, zero_point = q.astype(np_dtype), grid.zero_point.astype(np_dtype)
    if sqnr is not None:
        sqnr[layer.weight] = sqnr_db(weight, kernels.dequantize(q, grid.scale, zero_point, axis=grid.axis))
    q_name = graph.unique_name(model, f"{layer.weight}_quantized")
    s_name = graph.unique_name(model, f"{layer.weight}_scale")
    z_name = graph.unique_name(model, f"{layer.weight}_zero_point")
    graph.remove_initializers(model, [layer.weight])
    _drop_graph_input(model, layer.weight)
    graph.set_array(model, q_name, q)
    add_initializer(model, s_name, grid.scale)
    add_initializer(model, z_name, zero_point)
    attrs = {"axis": grid.axis} if grid.axis is not None else {}
    dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [layer.weight],
                          name=graph.unique_name(model, f"{layer.weight}_DequantizeLinear"), **attrs)
    model.graph.node.insert(0, dq)
    return grid


def embedding_layers(model: onnx.ModelProto, params: QuantizeStep) -> list[graph.WeightLayer]:
    """Gather tables (embeddings) the recipe selects, when ``embeddings`` is on: main-graph ones and
    those only an If / Loop / Scan body gathers from (PyTorch's EmbeddingBag is a Loop over the bags;
    its table stayed float32 and unlisted, a third of a recommender's file). A body reads the whole
    table, dequantized under its name."""
    if not params.embeddings or "Gather" in params.float_ops:
        return []
    return graph.layers_with_bodies(model, ("Gather",), include=params.include, exclude=params.exclude,
                                    min_params=params.min_params)


def quantize_embedding(model: onnx.ModelProto, layer: graph.WeightLayer) -> WeightGrid:
    """An embedding table [V, D] -> int8, one symmetric scale per row (s = absmax / 127).

    Each ``Gather(table, ids)`` becomes ``Gather(q, ids) -> Cast -> Mul(Gather(s[V, 1], ids))``:
    only the gathered rows are dequantized, never the whole table (a DequantizeLinear in front of
    the Gather would rebuild a BERT-size table on every call). ``Cast(q) * s`` is exactly
    DequantizeLinear's ``(q - 0) * s``. A table that something other than such a Gather also reads
    keeps a DequantizeLinear for those readers."""
    table = graph.get_array(model, layer.weight).astype(np.float32, copy=False)
    scale, zero = kernels.choose_qparams(table, bits=8, symmetric=True, signed=True, axis=0, method="absmax")
    q = kernels.quantize(np.ascontiguousarray(table), scale, zero, bits=8, signed=True, axis=0)
    q_name = graph.unique_name(model, f"{layer.weight}_quantized")
    rows_name = graph.unique_name(model, f"{layer.weight}_row_scale")
    graph.set_array(model, q_name, q)
    graph.set_array(model, rows_name, np.asarray(scale, np.float32).reshape(-1, 1))
    # a subgraph reading the table needs the whole (dequantized) table under its name
    others: list = [layer.weight] if layer.weight in subgraphs.subgraph_reads(model) else []
    gathers = 0
    for node, index in graph.consumers(model).get(layer.weight, []):
        if node.op_type != "Gather" or index != 0 or graph.attribute(node, "axis", 0) != 0:
            others.append(node)
            continue
        gathers += 1
        output, ids = node.output[0], node.input[1]
        gathered = graph.unique_name(model, f"{output}_int8")
        widened = graph.unique_name(model, f"{output}_float")
        row_scales = graph.unique_name(model, f"{output}_scale")
        node.input[0], node.output[0] = q_name, gathered
        model.graph.node.extend([
            helper.make_node("Cast", [gathered], [widened], to=onnx.TensorProto.FLOAT,
                             name=graph.unique_name(model, f"{node.name}_dequantize_cast")),
            helper.make_node("Gather", [rows_name, ids], [row_scales], axis=0,
                             name=graph.unique_name(model, f"{node.name}_row_scales")),
            helper.make_node("Mul", [widened, row_scales], [output],
                             name=graph.unique_name(model, f"{node.name}_dequantize_scale")),
        ])
    graph.remove_initializers(model, [layer.weight])
    if not gathers:
        # no Gather here reads rows (a table only a body reads): the unread row scales made ONNX
        # Runtime fail to load the model ("Failed to find existing initializer")
        graph.remove_initializers(model, [rows_name])
    _drop_graph_input(model, layer.weight)
    if others:
        s_name = graph.unique_name(model, f"{layer.weight}_scale")
        add_initializer(model, s_name, np.asarray(scale, np.float32))
        model.graph.node.insert(0, helper.make_node("DequantizeLinear", [q_name, s_name], [layer.weight], axis=0,
                                                    name=graph.unique_name(model, f"{layer.weight}_DequantizeLinear")))
    graph.sort_graph(model)
    return WeightGrid(np.asarray(scale, np.float32), np.asarray(zero), 0)


TABLE_READERS = ("Slice", "Add", "Expand", "Concat", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Tile")


def table_tensors(model: onnx.ModelProto, params: QuantizeStep) -> list[graph.WeightLayer]:
    """Float initializers that no layer multiplies but that are as large as a layer's weight and
    only moved or added (learned position tables and the like): left in float they cap the size
    ratio. Selected by the recipe's include / exclude / min_params like any weight."""
    readers = graph.consumers(model)
    found = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:     # 1-D: biases, norms
            continue
        layer = graph.WeightLayer(tensor.name, "", "", tuple(tensor.dims), 0, 0)
        users = readers.get(tensor.name, [])
        if (layer.params < max(params.min_params, 1024) or not users or
                not graph.selected(layer, params.include, params.exclude)):
            continue
        if all(node.op_type in TABLE_READERS and node.op_type not in params.float_ops
               and (index == 0 or node.op_type in ("Add", "Concat")) for node, index in users):
            found.append(graph.WeightLayer(tensor.name, users[0][0].name, users[0][0].op_type,
                                           tuple(tensor.dims), 0, 0))
    return found


def quantize_table(model: onnx.ModelProto, layer: graph.WeightLayer) -> WeightGrid:
    """int8, one symmetric scale for the tensor, behind a DequantizeLinear that keeps its name."""
    values = graph.get_array(model, layer.weight).astype(np.float32, copy=False)
    scale, zero = kernels.choose_qparams(values, bits=8, symmetric=True, signed=True, method="absmax")
    q = kernels.quantize(np.ascontiguousarray(values), scale, zero, bits=8, signed=True)
    q_name = graph.unique_name(model, f"{layer.weight}_quantized")
    s_name = graph.unique_name(model, f"{layer.weight}_scale")
    graph.remove_initializers(model, [layer.weight])
    _drop_graph_input(model, layer.weight)
    graph.set_array(model, q_name, q)
    add_initializer(model, s_name, np.asarray(scale, np.float32).reshape(()))
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", [q_name, s_name], [layer.weight],
                                                name=graph.unique_name(model, f"{layer.weight}_DequantizeLinear")))
    return WeightGrid(np.asarray(scale, np.float32), np.asarray(zero), None)


def _drop_graph_input(model: onnx.ModelProto, name: str) -> None:
    """Old models list initializers among the graph inputs too; a weight that became a node output
    must leave that list."""
    kept = [value for value in model.graph.input if value.name != name]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)


def _output_readers(model: onnx.ModelProto, decided: Plan) -> frozenset[str]:
    """Nodes that write a model output and that the plan does not quantize (an Identity that echoes
    an input, a last residual Add): they read the float tensor, not its DequantizeLinear, so a
    model output no integer kernel computes carries no rounding it does not need (an echoed input
    came back at rel_l2 0.01)."""
    outputs = {o.name for o in model.graph.output}
    quantized = {node.name for node in decided.compute_nodes + decided.sensitive_nodes}
    return frozenset(node.name for node in model.graph.node
                     if node.name not in quantized and node.op_type not in PASSTHROUGH_OPS
                     and any(name in outputs for name in node.output))


def insert_qdq(model: onnx.ModelProto, tensor: str, grid: ActivationGrid, relu: onnx.NodeProto | None = None,
               float_readers: frozenset[str] = frozenset()) -> None:
    """QuantizeLinear -> DequantizeLinear on ``tensor``. Its readers read the dequantized tensor,
    except the nodes named in ``float_readers`` (layers the recipe excludes), which keep reading the
    float tensor; with ``relu`` (folded) the pair replaces the ReLU and its output keeps the ReLU's
    output name."""
    position = _position_after(model, tensor)
    q_name = graph.unique_name(model, f"{tensor}_quantized")
    if relu is not None:
        dq_name = relu.output[0]
        model.graph.node.remove(relu)
        position = _position_after(model, tensor)
    else:
        dq_name = graph.unique_name(model, f"{tensor}_dequantized")
        for node in model.graph.node:
            if node.name in float_readers:
                continue
            for index, name in enumerate(node.input):
                if name == tensor:
                    node.input[index] = dq_name
    quantize = helper.make_node("QuantizeLinear", [tensor, grid.scale_name, grid.zero_point_name], [q_name],
                                name=graph.unique_name(model, f"{tensor}_QuantizeLinear"))
    dequantize = helper.make_node("DequantizeLinear", [q_name, grid.scale_name, grid.zero_point_name], [dq_name],
                                  name=graph.unique_name(model, f"{tensor}_DequantizeLinear"))
    model.graph.node.insert(position, dequantize)
    model.graph.node.insert(position, quantize)


def _position_after(model: onnx.ModelProto, tensor: str) -> int:
    for index, node in enumerate(model.graph.node):
        if tensor in node.output:
            return index + 1
    return 0   # a graph input


# ------------------------------------------------------------------------------- bias handling

def _bias_input(model: onnx.ModelProto, node: onnx.NodeProto,
                readers: dict[str, list[tuple[onnx.NodeProto, int]]] | None = None) -> tuple[str | None, int]:
    """(bias initializer name or None, channel axis of the node's output). ``readers``: the model's
    ``graph.consumers`` where the caller holds them (a loop over layers need not rebuild them)."""
    inits = graph.initializers(model)
    if node.op_type == "Conv":
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return (name if name in inits else None), 1
    if node.op_type == "Gemm":
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if name in inits and len(inits[name].dims) == 1:
            return name, 1
        return None, 1
    # MatMul: the bias lives in an Add that is the output's only reader
    readers = (graph.consumers(model) if readers is None else readers).get(node.output[0], [])
    if len(readers) == 1 and readers[0][0].op_type == "Add":
        add = readers[0][0]
        other = add.input[1 - readers[0][1]]
        if other in inits and len(inits[other].dims) == 1:
            return other, -1
    return None, -1


def quantize_bias(model: onnx.ModelProto, node: onnx.NodeProto, input_grid: ActivationGrid, weight: WeightGrid) -> bool:
    """Conv / Gemm bias -> int32 with s_b = s_x * s_w, z = 0, behind a DequantizeLinear that keeps
    the bias's name. False (bias left float) where it would overflow int32 or others read it."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return False
    name = node.input[2]
    inits = graph.initializers(model)
    if name not in inits or len(inits[name].dims) != 1 or len(graph.consumers(model).get(name, [])) != 1:
        return False
    bias = numpy_helper.to_array(inits[name]).astype(np.float64)
    scale = (np.float32(input_grid.scale) * weight.scale).astype(np.float32)
    if scale.ndim == 0:
        scale = np.full(bias.shape, scale, dtype=np.float32)
    if scale.shape != bias.shape or not (scale > 0).all():
        return False
    q = np.rint(bias / scale.astype(np.float64))     # rint: round half to even, as QuantizeLinear
    if q.min() < _INT32.min or q.max() > _INT32.max:
        return False
    q_name = graph.unique_name(model, f"{name}_quantized")
    s_name = graph.unique_name(model, f"{name}_scale")
    z_name = graph.unique_name(model, f"{name}_zero_point")
    graph.remove_initializers(model, [name])
    _drop_graph_input(model, name)
    graph.set_array(model, q_name, q.astype(np.int32))
    graph.set_array(model, s_name, scale)
    graph.set_array(model, z_name, np.zeros(bias.shape, dtype=np.int32))
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [name], axis=0,
                                                name=graph.unique_name(model, f"{name}_DequantizeLinear")))
    return True


# --------------------------------------------------------------------------------------- the step

def quantize_static(model: onnx.ModelProto, params: QuantizeStep, ctx: StepContext) -> StepResult:
    """Static int8 QDQ (see the module docstring); records a LayerRecord per quantized weight."""
    params = tensorrt_qdq.adapt(params, ctx)     # gpu with TensorRT: its symmetric form
    check(model, params, ctx)
    spec = params.activations
    fused: dict[str, int] = {}
    prepared = prepare(model, fused)
    if spec.int16:
        try:
            prepared = graph.ensure_opset(prepared, wide_activations.MIN_OPSET)
        except Exception as error:   # the converter raises several types; all mean "cannot upgrade"
            raise PipelineError(f"cannot raise the model's opset to {wide_activations.MIN_OPSET} for 16-bit "
                                f"activations: {error}") from error
    data = calibration_data(prepared, ctx)
    equalized: list[str] = []
    absorbed: list[str] = []
    if params.equalize or params.high_bias_absorption:
        from worker.pipeline.quantize import equalize
        # each conv1 output channel's calibration range: Clip(0, m) chains equalize where exact on
        # it, and high-bias absorption moves what always passes the activation into conv2's bias
        # (``prepare`` lifted Constant biases to initializers)
        channel_ranges = equalize.channel_ranges(prepared, data, ctx.check_cancelled)
        if params.equalize:
            equalized = equalize.equalize(prepared, channel_ranges)
        if params.high_bias_absorption:
            absorbed = equalize.absorb_high_bias(prepared, channel_ranges)
    layers = selected_layers(prepared, params)
    # layers whose activations stay float (weight-only int8): see weight_only_compute
    float_compute = weight_only_compute.choose(prepared, layers, params)
    integer_layers = [layer for layer in layers if layer.node not in float_compute]
    # the report's phases (``cost``): capture = running the model over the calibration data
    # (the ranges' histograms with SmoothQuant's maxima in the same pass, bias correction's means),
    # solve = the weights' grids (learned rounding among them), write = the Q/DQ nodes and int32 biases
    budget = int(ctx.options.get("capture_budget_bytes", activations.CAPTURE_BUDGET))
    smoothing = _smoothing(prepared, params, integer_layers, budget)
    float_readers = excluded_nodes(prepared, params)
    decided = plan(prepared, params, integer_layers, float_readers)
    ctx.progress(0.05, "calibrating activation ranges")
    with ctx.cost.phase("capture"):
        ranges = calibrate.calibrate(prepared, data, sorted(set(decided.calibrated.values())),
                                     method=spec.calibration, percentile=spec.percentile,
                                     progress=lambda f, m: ctx.progress(0.05 + 0.55 * f, m),
                                     budget_bytes=budget, deferred=smoothing[1])
    smoothed = [item.group.tensor for item in smoothing[0] if item.done]
    ctx.check_cancelled()
    with ctx.cost.phase("solve"):       # on the smoothed weights
        learned, rounding_info = _learned_rounding(prepared, params, layers, ctx)

    quantized = onnx.ModelProto()
    quantized.CopyFrom(prepared)
    weight_grids: dict[str, WeightGrid] = {}
    sqnr_of: dict[str, float] = {}
    # uint8 activations meet these weights in ORT's u8s8 kernels: see int8_storage
    unsigned = not spec.symmetric and int8_storage.unsigned_weights(ctx.target, ctx.options, params.integer_weights)

    storage_of: dict[str, str] = {}     # pair_saturation's per-layer int8 forms, chosen once the grids are in place

    def _unsigned(layer: graph.WeightLayer) -> bool:
        return unsigned and layer.node not in float_compute and layer.weight not in storage_of
    with ctx.cost.phase("solve"), graph.naming(quantized):
        for layer in layers:
            # a layer on float activations dequantizes its weight to float: no integer kernel reads it
            weight_grids[layer.weight] = quantize_weight(quantized, layer, params, _unsigned(layer),
                                                         learned.get(layer.weight), sqnr_of)
        embeddings = embedding_layers(quantized, params)
        for layer in embeddings:
            weight_grids[layer.weight] = quantize_embedding(quantized, layer)
        tables = table_tensors(quantized, params)
        for layer in tables:
            weight_grids[layer.weight] = quantize_table(quantized, layer)
    # layers inside If / Loop / Scan bodies: their weights int8 (the DequantizeLinear in the main
    # graph, read from the outer scope); activations inside a body are not calibrated and stay float
    # and recurrent cells' W / R (LSTM / GRU / RNN, main graph or body: ONNX Runtime runs them in
    # float, so weight-only int8, one scale per gate row, is what shrinks them)
    bodies = _weight_only_layers(quantized, params, {layer.weight for layer in layers + embeddings + tables})
    main_nodes = {node.name for node in quantized.graph.node}
    recurrent = [layer for layer in bodies if layer.op in weight_only.RECURRENT_OPS and layer.node in main_nodes]
    with ctx.cost.phase("solve"), graph.naming(quantized):
        for layer in bodies:
            weight_grids[layer.weight] = quantize_weight(quantized, layer, params)
    embeddings += tables + bodies

    grids: dict[str, ActivationGrid] = {}
    kept_float: dict[str, str] = {}
    with graph.naming(quantized):      # activation grids and their Q/DQ pairs: names only added
        forced_float = ctx.options.get("float_activations") or ()     # mixed_precision's choices
        for tensor, source in decided.calibrated.items():
            found = ranges.get(source)
            if tensor in forced_float:
                kept_float[tensor] = "kept float: max_output_error"
            elif found is None:
                kept_float[tensor] = "never seen on the calibration data"
            elif found.masked:
                kept_float[tensor] = "mask sentinel values (|x| >= 1e8) in calibration"
            elif spec.int16 and wide_activations.chosen(tensor, spec.int16):
                grids[tensor] = ActivationGrid(*wide_activations.grid16(quantized, tensor, found.lo, found.hi,
                                                                       spec.symmetric))
            else:
                grids[tensor] = activation_grid(quantized, tensor, found.lo, found.hi, spec.symmetric)
        folded_outputs = {relu.output[0]: out for out, relu in decided.relu_folds.items()}
        for output, source in decided.inherits.items():      # topological order: chains resolve in turn
            root = folded_outputs.get(source, source)
            if root in grids:
                grids[output] = grids[root]
        with ctx.cost.phase("write"):
            keep_float = float_readers | _output_readers(quantized, decided)
            for tensor, grid in grids.items():
                insert_qdq(quantized, tensor, grid, decided.relu_folds.get(tensor), keep_float)
    graph.sort_graph(quantized)

    saturation_of: dict[str, float] = {}
    seven_bit: set[str] = set()

    def choose_forms(measured: list[pair_saturation.Layer]) -> None:
        """Each measured layer's form (``pair_saturation.Layer.form``): the 8-bit grid stored int8, the
        7-bit grid stored int8, or the 8-bit grid left as uint8 + 128."""
        for item in measured:
            saturation_of[item.weight] = item.saturation
            form = item.form()
            if form == "uint8":
                continue
            if form == "int8":
                pair_saturation.store_signed(quantized, item)
                storage_of[item.weight] = int8_storage.storage_name(False)
                continue
            grid = weight_grids[item.weight]
            weight = graph.get_array(prepared, item.weight)
            q, scale = pair_saturation.store_seven_bit(quantized, item, weight, grid.axis)
            weight_grids[item.weight] = WeightGrid(scale, np.zeros_like(grid.zero_point), grid.axis)
            sqnr_of[item.weight] = sqnr_db(weight, kernels.dequantize(q, scale, np.zeros(scale.shape, np.int8),
                                                                      axis=grid.axis))
            storage_of[item.weight] = pair_saturation.SEVEN_BIT_STORAGE
            seven_bit.add(item.weight)
        unsigned_kept = sum(1 for item in measured if item.weight not in storage_of)
        int8_storage.note_measured(ctx.options, len(measured) - len(seven_bit) - unsigned_kept, len(seven_bit),
                                   unsigned_kept)

    # each integer layer's weight form on x86 without VNNI (pair_saturation), measured on bias
    # correction's pass over the quantized model, or on a pass of its own without bias correction
    weight_of = {layer.node: layer.weight for layer in integer_layers}
    sampler = (pair_saturation.Sampler(quantized, weight_of, lambda name: graph.get_array(prepared, name), choose_forms)
               if unsigned and int8_storage.chosen_by_host(ctx.options, params.integer_weights) else None)
    corrected: list[str] = []
    if params.bias_correction:
        ctx.progress(0.65, "bias correction")
        from worker.pipeline.quantize import bias_correction
        with ctx.cost.phase("capture"):
            corrected = bias_correction.correct(prepared, quantized, decided.compute_nodes,
                                                weight_of, data, ctx,
                                                relu_folded=set(decided.relu_folds), bias_input=_bias_input,
                                                rider=sampler)
    if sampler is not None and not sampler.finished:
        ctx.progress(0.75, "measuring the u8s8 kernel's pair saturation per layer")
        with ctx.cost.phase("capture"):
            pair_saturation.measure(sampler, quantized, data)

    int32_biases = 0
    input_grids = _dequantized_grids(quantized, grids)
    with ctx.cost.phase("write"), graph.naming(quantized):
        for node in list(quantized.graph.node):
            if node.name in weight_of and node.input[0] in input_grids:
                int32_biases += quantize_bias(quantized, node, input_grids[node.input[0]],
                                              weight_grids[weight_of[node.name]])
        graph.sort_graph(quantized)
    graph.check_if_in_memory(quantized)

    for layer in layers + embeddings:
        grid = weight_grids[layer.weight]
        record = ctx.layers.get(layer.weight) or LayerRecord(layer.weight, layer.node, layer.op)
        record.bits = 8
        signed = layer.op not in COMPUTE_OPS or params.weights is None or params.weights.symmetric
        record.grid = {"scale": grid.scale, "zero_point": grid.zero_point, "axis": grid.axis,
                       "block_size": None, "bits": 7 if layer.weight in seven_bit else 8, "signed": bool(signed)}
        if layer in layers:
            record.extra["weight_storage"] = (storage_of.get(layer.weight) or
                                              int8_storage.storage_name(_unsigned(layer) and bool(signed)))
            if layer.weight in saturation_of:
                record.extra["pair_saturation"] = saturation_of[layer.weight]
        if layer.weight in sqnr_of:
            record.extra["sqnr_db"] = sqnr_of[layer.weight]
        if layer.weight in rounding_info:
            record.extra["rounding"] = adaround.record(rounding_info[layer.weight])
        record.extra["activations"] = ("weight-only int8 rows (embedding)" if layer.op == "Gather" else
                                       "weight-only int8 (table)" if layer.op in TABLE_READERS else
                                       "weight-only int8 (recurrent cell)" if layer in recurrent else
                                       "weight-only int8 (inside a control-flow body)" if layer in bodies else
                                       f"weight-only int8, float activations: {float_compute[layer.node]}"
                                       if layer.node in float_compute else
                                       f"static int8 ({spec.calibration})")
        ctx.layers[layer.weight] = record
    ctx.progress(1.0, "static int8 done")
    metrics: dict[str, Any] = {
        "format": "qdq",
        "calibration": spec.calibration,
        "activation_dtype": "int8" if spec.symmetric else "uint8",
        "quantized_weights": len(layers),
        "float_activation_layers": len(float_compute),
        "quantized_embeddings": len(embeddings) - len(tables) - len(bodies),
        "quantized_tables": len(tables),
        "quantized_body_weights": len(bodies),
        "quantized_activations": len(grids),
        "int16_activations": sorted(t for t, g in grids.items() if g.dtype in (onnx.TensorProto.UINT16,
                                                                             onnx.TensorProto.INT16)),
        "float_activations": kept_float,
        "relu_folded": len(decided.relu_folds),
        **fused,
        "bias_corrected": len(corrected),
        "smoothed_inputs": len(smoothed),
        "equalized_layers": len(equalized),
        "bias_absorbed_layers": len(absorbed),
        "adarounded_layers": sum(1 for info in rounding_info.values() if info["kept"]),
        "int32_biases": int(int32_biases),
        "seven_bit_weights": len(seven_bit),
        "opset": graph.opset(quantized),
    }
    return StepResult(quantized, [layer.weight for layer in layers + embeddings], metrics)


def _learned_rounding(model: onnx.ModelProto, params: QuantizeStep, layers: list[graph.WeightLayer],
                      ctx: StepContext) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """``weights.rounding: adaround``: each selected layer's int8 integers learned on the grid
    ``weight_grid`` gives it (``quantize.adaround``), layer by layer on a copy of the model whose
    weights upstream are already rounded (activations float: the calibration samples carried
    through by ``quantize.gptq``'s runner). Layers without a matrix form (grouped / depthwise Conv)
    keep nearest. Returns (weight -> q, weight -> the search's errors)."""
    if params.weights is None or params.weights.rounding != "adaround":
        return {}, {}
    from worker.pipeline.quantize import gptq
    from worker.pipeline.quantize.grid import Grid

    ctx.progress(0.02, "learning weight rounding (adaround)")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    spec = params.weights
    runner = gptq.GptqRunner(work, layers, ctx, rounding="adaround")
    method = spec.scale_search or ("absmax" if spec.symmetric else "minmax")

    def grid_of(layer: graph.WeightLayer) -> Grid:
        axis = layer.out_axis if spec.granularity == "channel" else None
        return Grid(8, spec.symmetric, spec.symmetric, axis, None, method)

    solved = runner.quantize_all(layers, grid_of)
    return {weight: found[0] for weight, found in solved.items()}, runner.rounding_info


def _smoothing(model: onnx.ModelProto, params: QuantizeStep, layers: list[graph.WeightLayer], budget: int):
    """SmoothQuant (``quantize.smoothquant``) on the selected MatMul / Gemm layers: the groups'
    divisions put in place at s = 1, and the calibration pass's ``DeferredScales`` that sets s from
    its first samples. ([], None) when off or nothing to smooth."""
    if params.smoothquant is None:
        return [], None
    from worker.pipeline.quantize import smoothquant
    chosen = {layer.node for layer in layers}
    pending = smoothquant.prepare(model, [n for n in model.graph.node if n.name in chosen])
    if not pending:
        return [], None
    alpha = params.smoothquant
    deferred = calibrate.DeferredScales([item.tensor for item in pending], smoothquant.SAMPLES,
                                        lambda maxima: smoothquant.resolve(model, pending, maxima, alpha), budget)
    return pending, deferred


def _dequantized_grids(model: onnx.ModelProto, grids: dict[str, ActivationGrid]) -> dict[str, ActivationGrid]:
    """Map each DequantizeLinear output that carries an activation grid to that grid."""
    by_scale = {grid.scale_name: grid for grid in grids.values()}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] in by_scale:
            found[node.output[0]] = by_scale[node.input[1]]
    return found
