"""Least-squares compensation for removed input channels (He et al. 2017, "Channel Pruning for
Accelerating Very Deep Neural Networks", the reconstruction step, in closed form).

A layer that loses inputs R and keeps K computes ``X_K W_K^T`` instead of ``X W^T`` (rows = output
channels, columns = inputs; a Conv's inputs unfolded to its receptive fields). The kept weights that
best reproduce the original outputs on calibration data,

    min_{W'} ||X W^T - X_K W'^T||^2 + lambda ||W'||^2,    lambda = 0.01 mean(diag H),

are ``W' = W_K + W_R H_RK (H_KK + lambda I)^-1`` with ``H = X^T X / n``: what the removed inputs
carried is re-expressed through the kept inputs they correlate with. Where the layer has (or may be
given) a bias, a constant input column is appended to X, so the removed inputs' mean goes into the
bias (after a ReLU that mean is far from zero). The Hessian is taken on the model before pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from worker.pipeline import activations
from worker.pipeline.data import Dataset
from worker.pipeline.unfold import conv2d_geometry, conv_weight_from_matrix, conv_weight_matrix, unfold2d

DAMPING = 0.01
CALIBRATION_BATCH = 64
MAX_COLUMNS = 8192


@dataclass
class InputCut:
    """Layer ``node`` reads input features ``kept`` (positions along its input axis) of ``total``."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None      # None: the layer cannot take a bias (MatMul)
    kept: np.ndarray
    total: int


def _columns(cut: InputCut) -> tuple[int, dict | None] | None:
    if cut.node.op_type == "Conv":
        geometry = conv2d_geometry(cut.node, cut.weight.shape)
        if geometry is None:
            return None
        kh, kw = geometry["kernel"]
        return kh * kw * cut.total, geometry
    return cut.total, None


def _matrix(cut: InputCut, geometry: dict | None) -> np.ndarray:
    """Rows = outputs, columns = inputs (a Conv's in (dy, dx, c) order)."""
    if geometry is not None:
        return conv_weight_matrix(cut.weight.astype(np.float64))
    w = cut.weight.astype(np.float64)
    if cut.node.op_type == "MatMul" or (cut.node.op_type == "Gemm" and not _trans_b(cut.node)):
        return w.T
    return w


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _from_matrix(cut: InputCut, matrix: np.ndarray, geometry: dict | None) -> np.ndarray:
    if geometry is not None:
        return conv_weight_from_matrix(matrix, cut.weight.shape)
    if cut.node.op_type == "MatMul" or (cut.node.op_type == "Gemm" and not _trans_b(cut.node)):
        return np.ascontiguousarray(matrix.T)
    return np.ascontiguousarray(matrix)


def compensate(model: onnx.ModelProto, data: Dataset, cuts: list[InputCut]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """New (weight, bias) per node name, full-size (the removed columns are left for the slicing);
    layers too wide for a Hessian, or grouped / SAME-padded Convs, are not in the answer."""
    plans = []
    for cut in cuts:
        found = _columns(cut)
        if found is None or found[0] > MAX_COLUMNS:
            continue
        columns, geometry = found
        augmented = columns + (1 if cut.bias is not None else 0)
        plans.append((cut, columns, geometry, np.zeros((augmented, augmented))))
    if not plans:
        return {}
    sources = sorted({cut.node.input[0] for cut, _, _, _ in plans})
    for batch in activations.capture(model, data, sources, batch_size=CALIBRATION_BATCH):
        for cut, columns, geometry, hessian in plans:
            x = batch[cut.node.input[0]]
            flat = unfold2d(x, geometry) if geometry is not None else x.reshape(-1, columns)
            flat = flat.astype(np.float64)
            if cut.bias is not None:
                flat = np.concatenate([flat, np.ones((flat.shape[0], 1))], axis=1)
            hessian += flat.T @ flat
    out = {}
    for cut, columns, geometry, hessian in plans:
        matrix = _matrix(cut, geometry)
        if cut.bias is not None:
            matrix = np.concatenate([matrix, cut.bias.astype(np.float64).reshape(-1, 1)], axis=1)
        kept_channels = np.zeros(cut.total, dtype=bool)
        kept_channels[cut.kept] = True
        per_position = np.tile(kept_channels, columns // cut.total)     # (dy, dx, c), channel fastest
        kept = np.concatenate([per_position, [True]]) if cut.bias is not None else per_position
        k_idx, r_idx = np.flatnonzero(kept), np.flatnonzero(~kept)
        h_kk = hessian[np.ix_(k_idx, k_idx)]
        h_kk[np.diag_indices_from(h_kk)] += DAMPING * max(float(np.mean(np.diag(hessian))), 1e-12)
        delta = np.linalg.solve(h_kk, hessian[np.ix_(k_idx, r_idx)] @ matrix[:, r_idx].T).T
        matrix[:, k_idx] += delta
        bias = matrix[:, -1].astype(cut.weight.dtype) if cut.bias is not None else None
        weight_matrix = matrix[:, :columns] if cut.bias is not None else matrix
        out[cut.node.name] = (_from_matrix(cut, weight_matrix, geometry).astype(cut.weight.dtype), bias)
    return out
