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

Layers are done in graph order on the model quantized so far (each sees the inputs the quantized
layers before it produce); layers reading the same input share one capture. MatMul, Gemm (transA 0)
and plain 2-D Conv (group 1) take GPTQ; other layers (embeddings, recurrent cells, grouped Conv)
fall back to RTN, and the step's metrics say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

import kernels
from worker.pipeline import graph, sessions
from worker.pipeline.data import bind
from worker.pipeline.quantize.grid import choose_grid_params, expand
from worker.pipeline.step import StepContext
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
            lower = np.linalg.cholesky(damped)
            lower_inv = np.linalg.inv(lower)
            hinv = lower_inv.T @ lower_inv
            return np.ascontiguousarray(np.linalg.cholesky(hinv).T, dtype=np.float32), dead
        except np.linalg.LinAlgError:
            damping *= 10.0
    raise np.linalg.LinAlgError("the calibration Hessian stays singular after dampening")


class GptqRunner:
    """Hessians captured lazily, per input tensor, on the model as quantized so far."""

    def __init__(self, model: onnx.ModelProto, layers: list[graph.WeightLayer], ctx: StepContext):
        self.model = model
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

    def supports(self, layer: graph.WeightLayer) -> bool:
        return layer.weight in self.plans

    def _capture(self, source: str) -> None:
        """Hessians of every planned, not yet captured layer that reads ``source``; layers that see
        the input the same way (Q, K and V projections) share one matrix."""
        group = {w: p for w, p in self.plans.items() if p.source == source and w not in self.hessians}
        keys = {w: (p.columns, repr(sorted(p.geometry.items())) if p.geometry else None) for w, p in group.items()}
        views = {keys[w]: p for w, p in group.items()}
        sums = {key: np.zeros((p.columns, p.columns)) for key, p in views.items()}
        rows = {key: 0 for key in views}
        inputs = {i.name for i in self.model.graph.input}
        run = None if source in inputs else sessions.exposed_session(self.model, [source])
        for feeds in self.data.batches(CAPTURE_BATCH, self.limit):
            self.ctx.check_cancelled()
            x = np.asarray(feeds[source] if run is None else run.run([source], feeds)[0], dtype=np.float32)
            for key, plan in views.items():
                flat = unfold2d(x, plan.geometry) if plan.geometry is not None else x.reshape(-1, plan.columns)
                flat = flat.astype(np.float64)
                sums[key] += flat.T @ flat
                rows[key] += flat.shape[0]
        del run
        sessions.release_memory()
        for key in views:
            if rows[key]:
                sums[key] *= 2.0 / rows[key]
        for weight in group:
            self.hessians[weight] = sums[keys[weight]]

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
            self._capture(plan.source)
        hessian = self.hessians.pop(layer.weight)
        scale, zero_point = choose_grid_params(w, grid)
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
