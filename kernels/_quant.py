"""Wrappers of quant.c: quantize / dequantize on a (scale, zero point) grid per tensor, axis or block,
sub-byte packing, and the grid's choice (absmax, minmax, mse)."""

from __future__ import annotations

import numpy as np

from kernels._args import _bool, _check, _data, _fail, _int, _layout_for, _out, _param_layout, _ptr, _qrange, _wptr
from kernels._load import lib


def quantize(x, scale, zero_point, *, bits, signed, axis=None, block_size=None,
             out=None) -> np.ndarray:
    """ONNX QuantizeLinear: q = clamp(round_half_even(x / s) + z, qmin, qmax), one value per
    element (int8 when signed, else uint8). NaN -> z, +-Inf -> qmax / qmin. `out`: an existing
    array of that dtype and x's shape to write into (returned), not overlapping x."""
    x = _data(x, np.float32, "x")
    qmin, qmax = _qrange(bits, signed)
    mode, o, a, i, bs, s, z = _layout_for(x.shape, axis, block_size, scale, zero_point, "quantize")
    out = _out(out, np.int8 if qmin < 0 else np.uint8, x.shape, [x])
    if x.size == 0:
        return out
    _check(
        lib.fw_quantize(
            _ptr("float[]", x), o, a, i, mode, bs, _ptr("float[]", s), _ptr("int32_t[]", z),
            qmin, qmax, _wptr("uint8_t[]", out),
        )
    )
    return out


def dequantize(q, scale, zero_point, *, axis=None, block_size=None, out=None) -> np.ndarray:
    """ONNX DequantizeLinear: x' = (q - z) * s, float32 of q's shape (q int8 or uint8).
    `out`: an existing float32 array of q's shape to write into (returned), not overlapping q."""
    q = _data(q, np.int8, "q", [np.int8, np.uint8])
    mode, o, a, i, bs, s, z = _layout_for(q.shape, axis, block_size, scale, zero_point,
                                          "dequantize")
    out = _out(out, np.float32, q.shape, [q])
    if q.size == 0:
        return out
    _check(
        lib.fw_dequantize(
            _ptr("uint8_t[]", q), int(q.dtype == np.int8), o, a, i, mode, bs,
            _ptr("float[]", s), _ptr("int32_t[]", z), _wptr("float[]", out),
        )
    )
    return out


def pack(q, bits) -> np.ndarray:
    """Pack int8/uint8 values (flattened, C order) into ceil(n*bits/8) bytes the ONNX way."""
    q = _data(q, np.int8, "q", [np.int8, np.uint8])
    b = _int(bits, "bits")
    if b not in (1, 2, 4, 8):
        raise _fail(f"bits must be 1, 2, 4 or 8, got {b}")
    n = q.size
    out = np.empty((n * b + 7) // 8, dtype=np.uint8)
    _check(lib.fw_pack(_ptr("uint8_t[]", q), int(q.dtype == np.int8), n, b,
                       _wptr("uint8_t[]", out), out.size))
    return out


def unpack(packed, bits, *, signed, count) -> np.ndarray:
    """Inverse of pack: `count` int8 (signed, sign-extended) or uint8 values."""
    packed = _data(packed, np.uint8, "packed")
    b = _int(bits, "bits")
    if b not in (1, 2, 4, 8):
        raise _fail(f"bits must be 1, 2, 4 or 8, got {b}")
    sg = _bool(signed, "signed")
    c = _int(count, "count", 0, 2**62)
    out = np.empty(c, dtype=np.int8 if sg else np.uint8)
    _check(lib.fw_unpack(_ptr("uint8_t[]", packed), packed.size, b, int(sg), c,
                         _wptr("uint8_t[]", out)))
    return out


_QP_METHODS = {"absmax": 0, "minmax": 1, "mse": 2}


def choose_qparams(x, *, bits, symmetric, signed=True, axis=None, block_size=None,
                   method="absmax") -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero_point int32) in the layout quantize() takes; see README."""
    x = _data(x, np.float32, "x")
    qmin, qmax = _qrange(bits, signed)
    sym = _bool(symmetric, "symmetric")
    if method not in _QP_METHODS:
        raise _fail(f"method must be one of {sorted(_QP_METHODS)}, got {method!r}")
    if block_size is None and axis is None:
        mode, o, a, i, bs, shape = lib.FW_MODE_TENSOR, 1, 1, x.size, 1, ()
    else:
        mode, o, a, i, bs, shape = _param_layout(x.shape, axis, block_size, (0,), "choose_qparams")
    scale = np.empty(shape, dtype=np.float32)
    zp = np.empty(shape, dtype=np.int32)
    if scale.size == 0:
        return scale, zp
    _check(
        lib.fw_choose_qparams(
            _ptr("float[]", x), o, a, i, mode, bs, qmin, qmax, int(sym), _QP_METHODS[method],
            _wptr("float[]", scale), _wptr("int32_t[]", zp),
        )
    )
    return scale, zp
