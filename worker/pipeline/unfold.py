"""What a Conv's weight sees: its input unfolded into rows (im2col), so calibration-aware methods
(SparseGPT) treat a Conv as the matrix product it is, ``rows @ W_mat.T``.

Columns are ordered (dy, dx, c), channel fastest, to match ``conv_weight_matrix``: consecutive
columns are consecutive input channels at one kernel position, which is what N:M groups along the
input-channel axis need.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from worker.pipeline.graph import attribute


def conv2d_geometry(node: onnx.NodeProto, weight_shape: Sequence[int]) -> dict | None:
    """strides / pads / dilations of a plain 2-D Conv (group 1, explicit or VALID padding), or None."""
    if len(weight_shape) != 4 or attribute(node, "group", 1) != 1:
        return None
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = list(attribute(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    return {"kernel": tuple(weight_shape[2:]), "strides": tuple(attribute(node, "strides", [1, 1])),
            "pads": tuple(pads), "dilations": tuple(attribute(node, "dilations", [1, 1]))}


def conv_weight_matrix(w: np.ndarray) -> np.ndarray:
    """W[O, C, kh, kw] -> [O, kh*kw*C], columns in (dy, dx, c) order."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))


def conv_weight_from_matrix(matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The inverse of ``conv_weight_matrix``."""
    o, c, kh, kw = shape
    return np.ascontiguousarray(matrix.reshape(o, kh, kw, c).transpose(0, 3, 1, 2))


def output_size(h: int, w: int, geometry: dict) -> tuple[int, int]:
    """(Ho, Wo): the Conv's output grid over an H x W input (pads, strides and dilations applied)."""
    kh, kw = geometry["kernel"]
    sh, sw = geometry["strides"]
    top, left, bottom, right = geometry["pads"]
    dh, dw = geometry["dilations"]
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


def unfold2d(x: np.ndarray, geometry: dict) -> np.ndarray:
    """x[N, C, H, W] -> rows[N*Ho*Wo, kh*kw*C]: every receptive field the Conv multiplies with W."""
    kh, kw = geometry["kernel"]
    sh, sw = geometry["strides"]
    top, left, bottom, right = geometry["pads"]
    dh, dw = geometry["dilations"]
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho, wo = output_size(h, w, geometry)
    cols = np.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    for dy in range(kh):
        for dx in range(kw):
            window = padded[:, :, dy * dh: dy * dh + sh * (ho - 1) + 1: sh, dx * dw: dx * dw + sw * (wo - 1) + 1: sw]
            cols[:, :, :, dy, dx, :] = window.transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, kh * kw * c)


def unfold2d_every(x: np.ndarray, geometry: dict, every: int) -> np.ndarray:
    """``unfold2d(x, geometry)[::every]`` without unfolding the rows that are skipped: each kept
    receptive field is gathered from the (padded, channels-last) input directly. A Hessian that
    takes every 4th field of a 120 x 120 map unfolded all of them first, 4x the copying."""
    if every <= 1:
        return unfold2d(x, geometry)
    kh, kw = geometry["kernel"]
    sh, sw = geometry["strides"]
    top, left, bottom, right = geometry["pads"]
    dh, dw = geometry["dilations"]
    n, c, h, w = x.shape
    ho, wo = output_size(h, w, geometry)
    picked = np.arange(0, n * ho * wo, every)
    sample, position = np.divmod(picked, ho * wo)
    oy, ox = np.divmod(position, wo)
    channels_last = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))).transpose(0, 2, 3, 1)
    rows = np.empty((picked.size, kh, kw, c), dtype=x.dtype)
    for dy in range(kh):
        for dx in range(kw):
            rows[:, dy, dx, :] = channels_last[sample, oy * sh + dy * dh, ox * sw + dx * dw]
    return rows.reshape(picked.size, kh * kw * c)
