"""The ``prune`` step: set weights to zero (unstructured, N:M) or remove whole channels.

Methods and the math:

* magnitude, ``scope: layer`` — in every selected weight W with n elements, the
  ``k = round(sparsity * n)`` smallest |w| become zero (exactly k: ties at the threshold are kept
  back in index order).
* magnitude, ``scope: global`` — one budget ``k = round(sparsity * sum n_l)`` over all selected
  weights, spent on the smallest ``|w| / ||W_l||_F``. That minimises ``sum_l ||dW_l||^2 / ||W_l||^2``
  (the relative error of each layer) for k pruned weights, so a layer whose relative error grows
  fastest per pruned weight is protected, where a plain global |w| threshold would empty layers
  with small weights.
* sparsegpt — per layer (its share of the magnitude budget above under ``scope: global``: a budget
  from a global threshold on the OBS saliency ``w^2 / [H^-1]_jj`` over the layer's output energy
  was measured worse, 3.5x the output error on the bench transformer, because it empties layers
  whose inputs are nearly dead, where the one-weight-at-a-time saliency no longer holds), OBS pruning with
  the calibration Hessian ``H = 2/n X^T X`` of the layer's input, ``H += 0.01 mean(diag H) I``,
  handed to ``kernels.sparsegpt_prune`` as the upper Cholesky factor of ``H^-1``; the kept weights
  are updated to compensate. Layers are done in graph order on the model pruned so far; layers
  sharing one input share one capture. Once layers upstream are pruned a layer's input X~ differs
  from the original X, so its weights are first refit to the original outputs,
  ``M' = M (X^T X~ + lam I)(X~^T X~ + lam I)^-1`` (``hessians.drift_corrected``; ``P = M X^T X~`` summed as
  ``(X M^T)^T X~`` where the layer has few outputs), and
  then pruned with the Hessian of X~: together that minimises ``||X M^T - X~ M_pruned^T||`` rather
  than each layer's error on its own inputs (on the bench transformer at 50 %: output rel_l2 0.066
  -> 0.042 with ``scope: global``).
  Conv (2-D, group 1) is unfolded to its receptive fields; other layers fall back to magnitude.
* ``N:M`` — in every group of M consecutive weights along the input axis (the reduced axis:
  MatMul K, Gemm K, Conv input channels) the N largest |w| are kept (magnitude) or chosen by OBS
  (sparsegpt); the sparsity is then 1 - N/M and the ``sparsity`` field is not used. Layers whose
  input axis is not a multiple of M are left alone and reported.
* ``structure: channel`` — see ``worker.pipeline.prune.channels``.

Zeros stay zeros downstream: every pruned weight's ``LayerRecord`` carries ``mask`` (True = kept,
combined with any earlier mask) and ``sparsity`` for quantize, cluster and distill.
Selected: float weights of MatMul, Gemm, Conv and ConvTranspose (embedding tables are not pruned).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

import kernels
from core.errors import InvalidInput
from core.recipe import PruneStep
from worker.pipeline.data import bind
from worker.pipeline.graph import WeightLayer, attribute, get_array, read_as_data, set_array, weight_layers
from worker.pipeline.quantize import lift_constants
from worker.pipeline.step import StepContext, StepResult, selects_no_weight
from worker.pipeline.cost import LayerClock
from worker.pipeline.sequential import Propagation, budget_of
from worker.pipeline.hessians import (accumulate_drift, accumulate_hessians, damped, drift_refit,
                                      inverse_upper_factor, log_propagation, serial_lapack)
from worker.pipeline.prune.masks import exact_masks, normalized_scores
from worker.pipeline.records import StepLog, layer_record, sparsity_of
from worker.pipeline.unfold import conv2d_geometry, conv_weight_from_matrix, conv_weight_matrix

name = "prune"
Params = PruneStep

PRUNABLE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
SPARSEGPT_BLOCK = 128             # columns pruned together before their error is propagated on
MAX_HESSIAN_COLUMNS = 16384       # H is columns^2 float64; past this the memory is not worth it
CAPTURE_BATCH = 32                # samples per propagation batch (options["capture_batch"])


def check(model: onnx.ModelProto, params: PruneStep, ctx: StepContext) -> None:
    """Before any work: the selection matches at least one weight."""
    ops = ("Conv", "Gemm", "MatMul") if params.structure == "channel" else PRUNABLE_OPS
    if not any(weight_layers(m, ops=ops, include=params.include, exclude=params.exclude, min_params=params.min_params)
               for m in lift_constants.as_checked(model)):
        raise selects_no_weight("prune", ops, params, model)


def run(model: onnx.ModelProto, params: PruneStep, ctx: StepContext) -> StepResult:
    lift_constants.lift_constant_weights(model)
    if params.structure == "channel":
        from worker.pipeline.prune.channels import prune_channels
        return prune_channels(model, params, ctx)
    layers = weight_layers(model, ops=PRUNABLE_OPS, include=params.include, exclude=params.exclude,
                           min_params=params.min_params)
    if not layers:
        raise selects_no_weight("prune", PRUNABLE_OPS, params, model)
    if params.method == "sparsegpt" and not ctx.calibration:
        raise InvalidInput("prune with method sparsegpt needs calibration data",
                           [{"loc": ["method"], "msg": "needs calibration data"}])
    n_m = params.n_m
    log = StepLog()
    as_data = read_as_data(model, [layer.weight for layer in layers], PRUNABLE_OPS + ("Gather",))   # a tied table
    for layer in layers:
        if layer.weight in as_data:
            log.skip(layer.weight, f"also read as data by {as_data[layer.weight]}: zeros would change that result too")
    layers = [layer for layer in layers if layer.weight not in as_data]
    if n_m is not None:
        fitting = []
        for layer in layers:
            if layer.shape[layer.in_axis] % n_m[1]:
                log.skip(layer.weight, f"input axis of {layer.shape[layer.in_axis]} is not a multiple of M={n_m[1]}")
            else:
                fitting.append(layer)
        layers = fitting
        targets = {layer.weight: 1.0 - n_m[0] / n_m[1] for layer in layers}
    else:
        targets = _unstructured_targets(model, layers, params)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if params.method == "sparsegpt":
        results = _sparsegpt(out, model, layers, targets, n_m, ctx, log)
    else:
        results = {}
        for layer in layers:
            w = get_array(out, layer.weight)
            if n_m is not None:
                mask = kernels.nm_mask(np.ascontiguousarray(w, dtype=np.float32), n_m[0], n_m[1], axis=layer.in_axis).astype(bool)
            else:
                mask = targets[layer.weight]
            results[layer.weight] = (w, mask, "magnitude")
    return _commit(out, layers, results, ctx, log, params)


def _unstructured_targets(model: onnx.ModelProto, layers: list[WeightLayer], params: PruneStep) -> dict[str, Any]:
    """Per layer: the magnitude mask (magnitude) or the sparsity to ask SparseGPT for."""
    weights = [get_array(model, layer.weight) for layer in layers]
    if params.scope == "layer":
        masks = [exact_masks([np.abs(w.astype(np.float32))], round(params.sparsity * w.size))[0] for w in weights]
    else:
        total = sum(w.size for w in weights)
        masks = exact_masks(normalized_scores(weights), round(params.sparsity * total))
    if params.method == "sparsegpt":
        return {layer.weight: 1.0 - float(np.count_nonzero(mask)) / mask.size for layer, mask in zip(layers, masks)}
    return {layer.weight: mask for layer, mask in zip(layers, masks)}


def _commit(model: onnx.ModelProto, layers: list[WeightLayer], results: dict, ctx: StepContext,
            log: StepLog, params: PruneStep) -> StepResult:
    changed, zeros, total = [], 0, 0
    for layer in layers:
        if layer.weight not in results:
            continue
        w, mask, method = results[layer.weight]
        record = layer_record(ctx, layer)
        if record.mask is not None and record.mask.shape == mask.shape:
            mask = mask & record.mask          # an earlier prune's zeros stay zeros
        pruned = kernels.apply_mask(np.ascontiguousarray(w, dtype=np.float32), mask.astype(np.uint8))
        set_array(model, layer.weight, pruned.astype(w.dtype))
        record.mask = mask
        record.sparsity = sparsity_of(pruned)
        record.extra["method"] = method
        changed.append(layer.weight)
        zeros += int(np.count_nonzero(pruned == 0))
        total += pruned.size
        log.layers.append({"name": layer.weight, "node": layer.node, "op": layer.op, "params": int(pruned.size),
                           "sparsity": record.sparsity, "method": method})
    return StepResult(model, changed, log.metrics(sparsity=zeros / total if total else 0.0,
                                                  structure=params.structure, scope=params.scope))


def _sparsegpt_columns(model: onnx.ModelProto, layer: WeightLayer, node: onnx.NodeProto) -> tuple[int, str, dict | None] | str:
    """(Hessian size, activation tensor, conv geometry) of a layer SparseGPT can take, else why not."""
    if layer.op == "MatMul":
        return layer.shape[0], node.input[0], None
    if layer.op == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA=1"
        return layer.shape[layer.in_axis], node.input[0], None
    if layer.op == "Conv":
        geometry = conv2d_geometry(node, layer.shape)
        if geometry is None:
            return "Conv that is not 2-D, grouped, or uses auto_pad SAME"
        return int(np.prod(layer.shape[1:])), node.input[0], geometry
    return f"{layer.op} has no SparseGPT form"


def _as_matrix(w: np.ndarray, layer: WeightLayer, geometry: dict | None) -> np.ndarray:
    """The kernel's layout: rows = output channels, columns = inputs."""
    if geometry is not None:
        return conv_weight_matrix(w.astype(np.float32))
    matrix = w.astype(np.float32)
    return np.ascontiguousarray(matrix.T if layer.out_axis == 1 else matrix)


def _from_matrix(matrix: np.ndarray, layer: WeightLayer, geometry: dict | None) -> np.ndarray:
    if geometry is not None:
        return conv_weight_from_matrix(matrix, layer.shape)
    return np.ascontiguousarray(matrix.T if layer.out_axis == 1 else matrix)


def _hinv_cholesky(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damping)^-1, and which inputs were never active (diag 0)."""
    dead = np.diag(hessian) == 0
    return np.ascontiguousarray(inverse_upper_factor(damped(hessian)), dtype=np.float32), dead


def _sparsegpt(model: onnx.ModelProto, original: onnx.ModelProto, layers: list[WeightLayer], targets: dict[str, float],
               n_m: tuple[int, int] | None, ctx: StepContext, log: StepLog) -> dict:
    data = bind(model, ctx.calibration)
    nodes = {node.name: node for node in model.graph.node}
    plans: dict[str, list[tuple[WeightLayer, int, dict | None]]] = {}
    results: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for layer in layers:
        found = _sparsegpt_columns(model, layer, nodes[layer.node])
        if isinstance(found, str) or found[0] > MAX_HESSIAN_COLUMNS:
            reason = found if isinstance(found, str) else f"{found[0]} input columns exceed {MAX_HESSIAN_COLUMNS}"
            w, mask = _magnitude_fallback(model, layer, targets[layer.weight], n_m)
            results[layer.weight] = (w, mask, f"magnitude ({reason})")
            continue
        columns, source, geometry = found
        plans.setdefault(source, []).append((layer, columns, geometry))
    # groups in the order their input is made, so that every layer upstream of a group is pruned
    # before the propagation runs through it (sequential propagation, see worker.pipeline.sequential)
    made_at = {name: index for index, node in enumerate(model.graph.node) for name in node.output}
    ordered = sorted(plans.items(), key=lambda item: made_at.get(item[0], -1))
    clock = LayerClock(len(ordered), ctx.progress)
    batch = int(ctx.options.get("capture_batch", CAPTURE_BATCH))
    budget = budget_of(ctx.options)
    with Propagation(model, data, batch_size=batch, budget_bytes=budget) as current, \
            Propagation(original, data, batch_size=batch, budget_bytes=budget) as reference:
        for done, (source, group) in enumerate(ordered):
            ctx.check_cancelled()
            clock.tick(done, source, "capture")
            plan = {source: [(layer.weight, columns, geometry) for layer, columns, geometry in group]}
            # once a layer upstream is pruned, this one's inputs drift: correct for it first
            matrices = {layer.weight: _as_matrix(get_array(model, layer.weight), layer, geometry)
                        for layer, _, geometry in group}
            if done:
                drift = accumulate_drift(reference.stream([source]), current.stream([source]), plan, ctx.cost,
                                         weights=matrices)
                hessians = {key: pair[0] for key, pair in drift.items()}
            else:
                drift, hessians = None, accumulate_hessians(current.stream([source]), plan, ctx.cost)
            clock.tick(done, source, "solve")
            for layer, columns, geometry in group:
                with ctx.cost.phase("solve"), serial_lapack():
                    hinv_chol, dead = _hinv_cholesky(hessians.pop(layer.weight))
                    w = get_array(model, layer.weight)
                    matrix = matrices.pop(layer.weight)
                    if drift:
                        matrix = drift_refit(matrix.astype(np.float64), *drift.pop(layer.weight)).astype(np.float32)
                    matrix[:, dead] = 0.0          # an input that is never active carries nothing to keep
                    n, m = n_m if n_m is not None else (0, 0)
                    block = SPARSEGPT_BLOCK if not m else m * max(1, SPARSEGPT_BLOCK // m)   # whole N:M groups per block
                    w_hat, mask = kernels.sparsegpt_prune(matrix, hinv_chol, sparsity=targets[layer.weight], n=n, m=m,
                                                          block=block)
                    if not n:
                        # the kernel prunes floor(s * rows * block_cols) per column block; the few weights
                        # that leaves short of round(s * size) go by magnitude, so the count is exact
                        mask = exact_masks([np.where(mask != 0, np.abs(w_hat), 0.0).astype(np.float32)],
                                           round(targets[layer.weight] * w_hat.size))[0]
                        w_hat = np.where(mask, w_hat, 0.0).astype(np.float32)
                with ctx.cost.phase("write"):
                    new_w = _from_matrix(w_hat, layer, geometry).astype(w.dtype)
                    set_array(model, layer.weight, new_w)     # later groups see this layer already pruned
                    results[layer.weight] = (new_w, _from_matrix(mask, layer, geometry).astype(bool), "sparsegpt")
        log_propagation(log, current, reference)
    return results


def _magnitude_fallback(model: onnx.ModelProto, layer: WeightLayer, sparsity: float,
                        n_m: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    w = get_array(model, layer.weight)
    if n_m is not None:
        mask = kernels.nm_mask(np.ascontiguousarray(w, dtype=np.float32), n_m[0], n_m[1], axis=layer.in_axis).astype(bool)
    else:
        mask = exact_masks([np.abs(w.astype(np.float32))], round(sparsity * w.size))[0]
    return w, mask
