"""The grid a weight is quantized on: where its (scale, zero point) pairs run (per tensor, per output
channel, or in blocks along the input axis), how they are chosen, round-to-nearest onto it and back,
and a pair broadcast to one value per weight. Shared by weight-only RTN, GPTQ, dynamic int8 and sign
quantization."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import kernels
from core.recipe import WeightQuantSpec
from worker.pipeline import graph


@dataclass(frozen=True)
class Grid:
    """Where the (scale, zero point) pairs run: ``axis`` None = one for the tensor; with
    ``block_size`` the blocks run along ``axis``."""

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None
    block_size: int | None
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "axis": self.axis, "block_size": self.block_size}


def base_method(grid: Grid) -> str:
    """The scale rule a search starts from: ``output`` starts from absmax / minmax."""
    if grid.method == "output":
        return "absmax" if grid.symmetric else "minmax"
    return grid.method


def grid_for(layer: graph.WeightLayer, spec: WeightQuantSpec) -> Grid:
    """The layer's grid under ``spec``. Left null, the scale rule is the contract's: absmax / qmax
    (symmetric) or min / max (asymmetric); ``mse`` lowers GPTQ's int4 error further (docs/recipes.md)
    but is a searched clip, not that grid, so it is the user's choice."""
    signed = spec.symmetric
    method = spec.scale_search or ("absmax" if spec.symmetric else "minmax")
    if spec.granularity == "tensor":
        axis, block = None, None
    elif spec.granularity == "channel":
        axis, block = layer.out_axis, None
    else:
        axis, block = layer.in_axis, spec.block_size
    return Grid(spec.bits, signed, spec.symmetric, axis, block, method)


def choose_grid_params(w: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    return kernels.choose_qparams(w, bits=grid.bits, symmetric=grid.symmetric, signed=grid.signed,
                                  axis=grid.axis, block_size=grid.block_size, method=grid.method)


def quantize_rtn(w: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q unpacked int8/uint8, scale float32, zero_point int32) by round-to-nearest."""
    scale, zero_point = choose_grid_params(w, grid)
    q = kernels.quantize(w, scale, zero_point, bits=grid.bits, signed=grid.signed, axis=grid.axis,
                         block_size=grid.block_size)
    return q, scale, zero_point


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, grid: Grid) -> np.ndarray:
    return kernels.dequantize(q, scale, zero_point, axis=grid.axis, block_size=grid.block_size)


def collapse(full: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    """``expand``'s inverse: one value per weight element (constant per parameter) back to the
    DequantizeLinear layout."""
    full = np.asarray(full)
    if axis is None:
        return full.reshape(-1)[:1].reshape(())
    if block_size is None:
        index = [0] * full.ndim
        index[axis] = slice(None)
        return full[tuple(index)].copy()
    return np.take(full, np.arange(0, full.shape[axis], block_size), axis=axis)


def expand(param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """A DequantizeLinear scale / zero point broadcast to one value per weight element."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return np.broadcast_to(param.reshape(()), shape).copy()
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(param.reshape(view), shape).copy()
    return np.repeat(param, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
