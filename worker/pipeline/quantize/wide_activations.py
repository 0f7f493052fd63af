"""16-bit activations for chosen tensors under static quantization (``activations.int16``).

A tensor whose name matches one of the recipe's patterns gets a 16-bit Q/DQ pair instead of an
8-bit one: uint16 with ``s = (hi - lo) / 65535`` and ``z = clamp(round(-lo / s), 0, 65535)``
(asymmetric), or int16 with ``s = max(|lo|, |hi|) / 32767`` and ``z = 0`` (symmetric), over the same
calibrated range (the int8 formula of docs/recipes.md with 16-bit qmin / qmax). 256 times finer than int8: for
the few tensors where 8 bits cost the most (a sensitivity ranking names them), at the price of
running their readers on dequantized float (ONNX Runtime has no 16-bit integer kernels).
QuantizeLinear / DequantizeLinear take 16-bit types from opset 21; ``MIN_OPSET``.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import numpy as np
import onnx

from onnx import numpy_helper

from worker.pipeline import graph

MIN_OPSET = 21


def chosen(tensor: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(tensor, pattern) for pattern in patterns)


def grid16(model: onnx.ModelProto, tensor: str, lo: float, hi: float,
           symmetric: bool) -> tuple[float, int, int, str, str]:
    """(scale, zero point) for [lo, hi] on a 16-bit grid, stored as two new scalar initializers:
    (scale, zero point, element type, scale name, zero point name), the fields of
    ``static.ActivationGrid`` (static imports this module, so the grid is built there)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        bound = max(-lo, hi)
        scale = np.float32(bound / 32767.0 if bound > 0 else 1.0)
        zero, dtype, np_dtype = 0, onnx.TensorProto.INT16, np.int16
    else:
        scale = np.float32((hi - lo) / 65535.0 if hi > lo else 1.0)
        zero = int(np.clip(np.rint(-lo / float(scale)), 0, 65535))
        dtype, np_dtype = onnx.TensorProto.UINT16, np.uint16
    scale_name = graph.unique_name(model, f"{tensor}_scale")
    zero_name = graph.unique_name(model, f"{tensor}_zero_point")
    # 0-d arrays: a per-tensor scale / zero point must be a scalar
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), scale_name))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(zero).astype(np_dtype).reshape(()), zero_name))
    return float(scale), zero, dtype, scale_name, zero_name
