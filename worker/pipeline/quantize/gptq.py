"""GPTQ: weights rounded one input column at a time, each column's rounding error pushed onto the
columns not yet rounded, weighted by the calibration Hessian of the layer's input.

For a layer ``y = x W`` seen as ``W_mat[rows = outputs, cols = inputs]``:
    H = 2/n X^T X                 (X: every row of the layer's input over the calibration set;
                                   for a 2-D Conv, every receptive field, im2col order (dy, dx, c))
    H += 0.01 * mean(diag H) * I  (dampening; inputs never active get H_ii = 1 and weight 0)
    U = upper Cholesky factor of H^-1
    kernels.gptq_quantize(W_mat, U, s, z): for each column j: q_j = round(w_j / s_j) + z_j,
        e = (w_j - w'_j) / U_jj,  W[:, j+1:] -= e U[j, j+1:]
The grid (s, z) is chosen up front by ``choose_qparams`` on the original weight in the DequantizeLinear
layout (per tensor / channel / block) and handed to the kernel expanded to one (s, z) per element, so
any layout - a Conv's blocks, act-order's permuted columns - maps onto the same stored grid.
Act-order (``options["gptq_act_order"]``, default on): columns in order of decreasing H_jj, so the
most active inputs are rounded first, while there is most freedom left to compensate.

The same runner serves the other calibrated weight-only choices (``GptqRunner(rounding=...)``):
``rounding="nearest"`` rounds to nearest instead of compensating (with ``weights.scale_search:
output``, ``quantize.output_scales``, and / or AWQ); ``rounding="adaround"`` learns each weight's
up / down choice for the layer's output error (``quantize.adaround``); ``awq=True`` scales each group's weights by
activation-aware factors first (``quantize.awq``), GPTQ then solving the scaled problem.

Layers are done in graph order on the model quantized so far (each sees the inputs the quantized
layers before it produce), by sequential propagation: the calibration samples are carried through
the model once, segment by segment (``worker.pipeline.sequential``); layers reading the same input
share one capture. MatMul, Gemm (transA 0)
and plain 2-D Conv (group 1) take GPTQ; other layers (embeddings, recurrent cells, grouped Conv)
fall back to RTN, and the step's metrics say so.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

import kernels
from worker.pipeline import graph
from worker.pipeline.cost import LayerClock
from worker.pipeline.data import bind
from worker.pipeline.hessians import accumulate_hessians, inverse_upper_factor, serial_lapack
from worker.pipeline.quantize import adaround, awq, output_scales
from worker.pipeline.quantize.grid import Grid, base_method, choose_grid_params, collapse, dequantize, expand, quantize_rtn
from worker.pipeline.sequential import Propagation, budget_of
from worker.pipeline.step import LayerRecord, StepContext
from worker.pipeline.unfold import conv2d_geometry, conv_weight_from_matrix, conv_weight_matrix, unfold2d

DAMPING = 0.01
MAX_COLUMNS = 16384            # H is columns^2 float64; past this RTN is used
CAPTURE_BATCH = 32
DEFAULT_SAMPLES = 512


@dataclass
class _Plan:
    columns: int
    source: str                 # the activation tensor the weight multiplies
    geometry: dict | None       # 2-D Conv geometry (im2col), None for MatMul / Gemm


def _plan(layer: graph.WeightLayer, node: onnx.NodeProto) -> _Plan | str:
    if layer.op == "MatMul":
        return _Plan(layer.shape[0], node.input[0], None)
    if layer.op == "Gemm":
        if graph.attribute(node, "transA", 0):
            return "Gemm with transA=1"
        return _Plan(layer.shape[layer.in_axis], node.input[0], None)
    if layer.op == "Conv":
        geometry = conv2d_geometry(node, layer.shape)
        if geometry is None:
            return "Conv that is not 2-D with group 1 and explicit padding"
        return _Plan(int(np.prod(layer.shape[1:])), node.input[0], geometry)
    return f"{layer.op} has no GPTQ form"


def hinv_upper(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + dampening)^-1 (float32) and the inputs never active.
    Dampening grows tenfold until H is positive definite."""
    hessian = np.array(hessian, dtype=np.float64)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(hessian)))
    damping = DAMPING
    for _ in range(6):
        damped = hessian + damping * mean_diag * np.eye(hessian.shape[0])
        try:
            return np.ascontiguousarray(inverse_upper_factor(damped), dtype=np.float32), dead
        except np.linalg.LinAlgError:
            damping *= 10.0
    raise np.linalg.LinAlgError("the calibration Hessian stays singular after dampening")


class GptqRunner:
    """Hessians captured lazily, per input tensor, on the model as quantized so far."""

    def __init__(self, model: onnx.ModelProto, layers: list[graph.WeightLayer], ctx: StepContext,
                 rounding: str = "gptq", use_awq: bool = False):
        self.model = model
        self.rounding = rounding
        self.use_awq = use_awq
        self.scaled: dict[str, np.ndarray] = {}          # AWQ: weight -> diag(s) W, the weight's layout
        self.input_scales: dict[str, tuple[str, np.ndarray]] = {}   # weight -> (input tensor, s)
        self.awq_alpha: dict[str, float] = {}            # input tensor -> the alpha chosen
        self.mean_abs: dict[str, np.ndarray] = {}        # AWQ: input tensor -> mean |x| per last-axis channel
        self.ctx = ctx
        self.data = bind(model, ctx.calibration)
        self.limit = int(ctx.options.get("gptq_samples", DEFAULT_SAMPLES))
        self.act_order = bool(ctx.options.get("gptq_act_order", True))
        nodes = {node.name: node for node in model.graph.node}
        self.plans: dict[str, _Plan] = {}
        self.fallback: dict[str, str] = {}
        for layer in layers:
            node = nodes.get(layer.node)
            found = _plan(layer, node) if node is not None else "layer node not found"
            if isinstance(found, _Plan) and found.columns > MAX_COLUMNS:
                found = f"{found.columns} input columns exceed {MAX_COLUMNS}"
            if isinstance(found, str):
                self.fallback[layer.weight] = found
            else:
                self.plans[layer.weight] = found
        self.hessians: dict[str, np.ndarray] = {}
        self.rounding_info: dict[str, dict] = {}        # adaround: weight -> its output errors

    def supports(self, layer: graph.WeightLayer) -> bool:
        return layer.weight in self.plans

    def _capture(self, source: str, batches) -> None:
        """Hessians of every planned, not yet captured layer that reads ``source``, from the batches
        the propagation streams; layers that see the input the same way (Q, K and V projections)
        share one matrix."""
        group = {w: p for w, p in self.plans.items() if p.source == source and w not in self.hessians}
        keys = {w: (p.columns, repr(sorted(p.geometry.items())) if p.geometry else None) for w, p in group.items()}
        views = {keys[w]: p for w, p in group.items()}
        plan = {source: [(key, p.columns, p.geometry) for key, p in views.items()]}
        sums = accumulate_hessians(batches, plan, self.ctx.cost)
        for weight in group:
            self.hessians[weight] = sums[keys[weight]]

    def quantize_all(self, layers: list[graph.WeightLayer], grid_of) -> dict[str, tuple]:
        """GPTQ for every supported layer, by sequential propagation (``worker.pipeline.sequential``):
        groups of layers that read one input go in the order that input is made; each group's
        Hessian comes from the calibration samples carried through the model with every layer
        upstream already quantized (its float weight replaced by ``w'``, which is what the
        DequantizeLinear put in later computes). Returns weight -> (q, scale, zero point, w', w)."""
        chosen = [layer for layer in layers if self.supports(layer)]
        made_at = {name: index for index, node in enumerate(self.model.graph.node) for name in node.output}
        sources: dict[str, list[graph.WeightLayer]] = {}
        for layer in chosen:
            sources.setdefault(self.plans[layer.weight].source, []).append(layer)
        ordered = sorted(sources.items(), key=lambda item: made_at.get(item[0], -1))
        clock = LayerClock(len(chosen), self.ctx.progress, share=(0.0, 0.9))
        results: dict[str, tuple] = {}
        done = 0
        batch = int(self.ctx.options.get("capture_batch", CAPTURE_BATCH))
        with Propagation(self.model, self.data, batch_size=batch, limit=self.limit,
                         budget_bytes=budget_of(self.ctx.options)) as propagation:
            for source, group in ordered:
                self.ctx.check_cancelled()
                clock.tick(done, group[0].weight, "capture")
                batches = propagation.stream([source])
                self._capture(source, self._measuring(source, batches) if self.use_awq else batches)
                if self.use_awq:
                    with self.ctx.cost.phase("awq"):
                        self._scale_inputs(source, group, grid_of)
                for layer in group:
                    clock.tick(done, layer.weight, "solve")
                    tensor = graph.initializers(self.model)[layer.weight]
                    w = numpy_helper.to_array(tensor)
                    grid = grid_of(layer)
                    with self.ctx.cost.phase("solve"), serial_lapack():
                        target = self.scaled.pop(layer.weight, w.astype(np.float32))
                        q, scale, zero_point, w_hat = self.quantize(layer, target, grid)
                        q, w_hat = keep_pruned_zeros(self.ctx.layers.get(layer.weight), q, w_hat, zero_point, grid)
                    with self.ctx.cost.phase("write"):
                        # downstream groups see this layer as the DequantizeLinear (and the 1/s in
                        # front of it, with AWQ) will compute it
                        graph.set_array(self.model, layer.weight, self.effective(layer, w_hat).astype(w.dtype))
                    results[layer.weight] = (q, scale, zero_point, w_hat, w)
                    done += 1
            self.propagation = {"segments": propagation.stats.segments, "restarts": propagation.stats.restarts,
                                "spilled_batches": propagation.stats.spilled,
                                "peak_held_bytes": max(propagation.stats.held_bytes, default=0)}
        return results

    def _measuring(self, source: str, batches):
        """The batches, unchanged, while AWQ's mean |x| per input channel of ``source`` is summed."""
        total, count = None, 0
        for batch in batches:
            x = batch[source]
            flat = np.abs(x.reshape(-1, x.shape[-1]), dtype=np.float64) if x.ndim else None
            if flat is not None:
                total = flat.sum(axis=0) if total is None else total + flat.sum(axis=0)
                count += flat.shape[0]
            yield batch
        if count:
            self.mean_abs[source] = total / count

    def _scale_inputs(self, source: str, group: list[graph.WeightLayer], grid_of) -> None:
        """AWQ (``quantize.awq``) for the MatMul / Gemm layers of ``group``: one ``s`` for them all,
        chosen on their captured Hessian, which is rescaled to the scaled weights' input."""
        nodes = {node.name: node for node in self.model.graph.node}
        readers = graph.consumers(self.model)
        chosen = [layer for layer in group if self.plans[layer.weight].geometry is None
                  and awq.eligible(nodes[layer.node], layer.weight, readers)]
        if not chosen:
            return
        hessian = self.hessians[chosen[0].weight]
        inits = graph.initializers(self.model)
        weights = {layer.weight: numpy_helper.to_array(inits[layer.weight]).astype(np.float32) for layer in chosen}

        def nearest(matrix: np.ndarray, layer: graph.WeightLayer) -> np.ndarray:
            # the search rounds on the plain absmax / minmax grid, as AWQ does: a scale search
            # inside each of the alphas would cost 10-100x more for a choice it hardly moves
            grid = grid_of(layer)
            grid = replace(grid, method="absmax" if grid.symmetric else "minmax")
            array = self._from_matrix(matrix, layer)
            q, scale, zero_point = quantize_rtn(array, grid)
            return self._as_matrix(dequantize(q, scale, zero_point, grid), layer)

        matrices = [self._as_matrix(weights[layer.weight], layer) for layer in chosen]
        quantizers = [lambda matrix, layer=layer: nearest(matrix, layer) for layer in chosen]
        mean_abs = self.mean_abs.get(source)
        if mean_abs is None or mean_abs.shape[0] != matrices[0].shape[1]:
            return
        alpha, s, _ = awq.search(matrices, hessian, mean_abs, quantizers)
        self.awq_alpha[source] = alpha
        if alpha == 0.0:
            return
        scaled_hessian = hessian / np.outer(s, s)
        for matrix, layer in zip(matrices, chosen):
            self.scaled[layer.weight] = self._from_matrix(np.ascontiguousarray(matrix * s), layer)
            self.input_scales[layer.weight] = (source, s)
            self.hessians[layer.weight] = scaled_hessian

    def effective(self, layer: graph.WeightLayer, w_hat: np.ndarray) -> np.ndarray:
        """The float weight the layer computes with: ``w'``, divided back by AWQ's ``s`` where it was scaled."""
        if layer.weight not in self.input_scales:
            return w_hat
        _, s = self.input_scales[layer.weight]
        return self._from_matrix(self._as_matrix(w_hat, layer) / s, layer)

    def _as_matrix(self, array: np.ndarray, layer: graph.WeightLayer) -> np.ndarray:
        if self.plans[layer.weight].geometry is not None:
            return conv_weight_matrix(array)
        return np.ascontiguousarray(array.T if layer.out_axis == 1 else array)

    def _from_matrix(self, matrix: np.ndarray, layer: graph.WeightLayer) -> np.ndarray:
        if self.plans[layer.weight].geometry is not None:
            return conv_weight_from_matrix(matrix, layer.shape)
        return np.ascontiguousarray(matrix.T if layer.out_axis == 1 else matrix)

    def quantize(self, layer: graph.WeightLayer, w: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q, scale, zero_point, w') in the DequantizeLinear layout of ``grid``."""
        plan = self.plans[layer.weight]
        if layer.weight not in self.hessians:
            raise KeyError(f"no Hessian captured for {layer.weight!r} (use quantize_all)")
        hessian = self.hessians.pop(layer.weight)
        if grid.method == "output":
            scale, zero_point = self._output_scales(layer, w, grid, hessian)
        else:
            scale, zero_point = choose_grid_params(w, grid)
        if self.rounding == "adaround":
            return self._adaround(layer, w, grid, hessian, scale, zero_point)
        if self.rounding == "nearest":
            q = kernels.quantize(w, scale, zero_point, bits=grid.bits, signed=grid.signed, axis=grid.axis,
                                 block_size=grid.block_size)
            return q, scale, zero_point, dequantize(q, scale, zero_point, grid)
        s_full = self._as_matrix(expand(scale, w.shape, grid.axis, grid.block_size).astype(np.float32), layer)
        z_full = self._as_matrix(expand(zero_point, w.shape, grid.axis, grid.block_size).astype(np.int32), layer)
        matrix = self._as_matrix(w.astype(np.float32), layer)
        order = np.argsort(-np.diag(hessian), kind="stable") if self.act_order else np.arange(plan.columns)
        hinv_chol, dead = hinv_upper(hessian[np.ix_(order, order)])
        matrix = np.ascontiguousarray(matrix[:, order])
        matrix[:, dead] = 0.0           # an input that is never active carries nothing to keep
        q_perm, _ = kernels.gptq_quantize(matrix, hinv_chol, np.ascontiguousarray(s_full[:, order]),
                                          np.ascontiguousarray(z_full[:, order]), bits=grid.bits,
                                          signed=grid.signed, group_size=1)
        inverse = np.argsort(order)
        q = self._from_matrix(np.ascontiguousarray(q_perm[:, inverse]), layer)
        w_hat = kernels.dequantize(q, scale, zero_point, axis=grid.axis, block_size=grid.block_size)
        return q, scale, zero_point, w_hat

    def _adaround(self, layer: graph.WeightLayer, w: np.ndarray, grid: Grid, hessian: np.ndarray,
                  scale: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``weights.rounding: adaround`` (``quantize.adaround``): each weight rounded up or down for the
        layer's output error on its Hessian, on the grid already chosen; never worse than nearest there."""
        qmin, qmax = (-(1 << (grid.bits - 1)), (1 << (grid.bits - 1)) - 1) if grid.signed else (0, (1 << grid.bits) - 1)
        expanded = lambda param, dtype: self._as_matrix(  # noqa: E731
            expand(param, w.shape, grid.axis, grid.block_size).astype(dtype), layer)
        h = np.array(hessian, dtype=np.float64)
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0         # an input never active: its weights' error costs nothing, as nearest's
        q_matrix, info = adaround.optimise(self._as_matrix(w.astype(np.float32), layer), h,
                                           expanded(scale, np.float32), expanded(zero_point, np.float32), qmin, qmax)
        self.rounding_info[layer.weight] = info
        q = self._from_matrix(q_matrix, layer).astype(np.int8 if grid.signed else np.uint8)
        return q, scale, zero_point, dequantize(q, scale, zero_point, grid)

    def _output_scales(self, layer: graph.WeightLayer, w: np.ndarray, grid: Grid,
                       hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``weights.scale_search: output`` (``quantize.output_scales``): each channel's / block's clip
        chosen for the layer's output error on its captured Hessian, from the absmax / minmax grid."""
        base = replace(grid, method=base_method(grid))
        scale, zero_point = choose_grid_params(w, base)
        expanded = lambda param, dtype: self._as_matrix(  # noqa: E731
            expand(param, w.shape, grid.axis, grid.block_size).astype(dtype), layer)
        ids = expanded(np.arange(scale.size).reshape(scale.shape), np.int64)
        if grid.block_size is not None:
            first_row = ids[0]
            groups = [np.flatnonzero(first_row == index) for index in np.unique(first_row)]
        else:
            groups = None
        qmin, qmax = (-(1 << (grid.bits - 1)), (1 << (grid.bits - 1)) - 1) if grid.signed else (0, (1 << grid.bits) - 1)
        dead = np.diag(hessian) == 0
        h = np.array(hessian, dtype=np.float64)
        h[dead, dead] = 1.0
        full = output_scales.search(self._as_matrix(w.astype(np.float32), layer), h,
                                    expanded(scale, np.float32), expanded(zero_point, np.int32),
                                    groups, grid.axis is None, qmin, qmax)
        return collapse(self._from_matrix(full, layer), grid.axis, grid.block_size).astype(np.float32), zero_point


def keep_pruned_zeros(record: LayerRecord | None, q: np.ndarray, w_hat: np.ndarray, zero_point: np.ndarray,
                      grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Weights an earlier prune step zeroed stay exactly zero (q = z). RTN keeps them by itself
    (round(0 / s) + z = z); GPTQ's error compensation may move them, so they are put back here."""
    if record is None or record.mask is None or record.mask.shape != q.shape:
        return q, w_hat
    pruned = ~np.asarray(record.mask, dtype=bool)
    zeros = expand(zero_point, q.shape, grid.axis, grid.block_size).astype(q.dtype)
    q = np.where(pruned, zeros, q)
    return q, np.where(pruned, np.float32(0.0), w_hat).astype(np.float32)
