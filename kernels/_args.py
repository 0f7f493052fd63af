"""Argument checks shared by every wrapper: arrays of exactly the dtype asked for (C-contiguous,
aligned; never converted), integers / floats / bools in range, axes, ``out=`` buffers that share no
memory with the inputs, and the (scale, zero point) layouts; ``_check`` turns a C status into
``KernelError`` with the C message."""

from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np

from kernels._load import ffi, lib


class KernelError(ValueError):
    """Bad argument (or a failure) reported by the kernel library; carries the C message."""


def _check(rc: int) -> None:
    if rc != 0:
        msg = ffi.string(lib.fw_last_error()).decode("utf-8", "replace")
        raise KernelError(msg or f"kernel error {rc}")


def _fail(msg: str) -> KernelError:
    return KernelError(msg)


def _data(x, dtype, name: str, dtypes: Sequence | None = None) -> np.ndarray:
    """A C-contiguous, aligned ndarray of exactly `dtype` (or one of `dtypes`); no conversion."""
    if not isinstance(x, np.ndarray):
        if isinstance(x, np.generic):
            x = np.asarray(x)
        else:
            raise _fail(f"{name} must be a numpy array, got {type(x).__name__}")
    allowed = [np.dtype(d) for d in (dtypes or [dtype])]
    if x.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise _fail(f"{name} must have dtype {names}, got {x.dtype}")
    return np.require(x, requirements=["C_CONTIGUOUS", "ALIGNED"])


def _int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise _fail(f"{name} must be an integer, got bool")
    try:
        i = operator.index(v)
    except TypeError:
        raise _fail(f"{name} must be an integer, got {type(v).__name__}") from None
    lo = -(2**62) if lo is None else lo  # everything crosses into C as int64
    hi = 2**62 if hi is None else hi
    if i < lo:
        raise _fail(f"{name} must be >= {lo}, got {i}")
    if i > hi:
        raise _fail(f"{name} must be <= {hi}, got {i}")
    return i


def _float(v, name: str, finite: bool = True) -> float:
    if isinstance(v, (bool, np.bool_)):
        raise _fail(f"{name} must be a number, got bool")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _fail(f"{name} must be a number, got {type(v).__name__}") from None
    if finite and not math.isfinite(f):
        raise _fail(f"{name} must be finite, got {f}")
    return f


def _bool(v, name: str) -> bool:
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
        return bool(v)
    raise _fail(f"{name} must be a bool, got {v!r}")


def _axis(axis, ndim: int, name: str = "axis") -> int:
    a = _int(axis, name)
    if not -ndim <= a < ndim:
        raise _fail(f"{name} {a} out of range for a {ndim}-d array")
    return a % ndim


def _split(shape: tuple, axis: int) -> tuple[int, int, int]:
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return outer, shape[axis], inner


def _ptr(ctype: str, a: np.ndarray):
    return ffi.from_buffer(ctype, a, require_writable=False)


def _wptr(ctype: str, a: np.ndarray):
    return ffi.from_buffer(ctype, a, require_writable=True)


def _out(out, dtype, shape: tuple, inputs: Sequence[np.ndarray], same_ok: np.ndarray | None = None
         ) -> np.ndarray:
    """A new array, or the caller's `out=` buffer after checks: an ndarray of exactly `dtype` and
    `shape`, C-contiguous, aligned and writeable, sharing no memory with the kernel's inputs (the
    threads would read what others already overwrote). `same_ok`: an input that `out` may be
    exactly (same buffer, dtype and shape), for elementwise kernels that read each element before
    writing it."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise _fail(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.dtype(dtype):
        raise _fail(f"out must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise _fail(f"out shape {out.shape} != expected {tuple(shape)}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise _fail("out must be C-contiguous and aligned")
    if not out.flags.writeable:
        raise _fail("out is read-only")
    for a in inputs:
        if (same_ok is not None and a is same_ok and out.size
                and out.__array_interface__["data"][0] == a.__array_interface__["data"][0]):
            continue  # exactly the input: the elementwise kernel reads before it writes
        if np.may_share_memory(out, a):
            raise _fail("out overlaps an input array")
    return out


def _qrange(bits, signed) -> tuple[int, int]:
    b = _int(bits, "bits")
    if b not in (2, 4, 8):
        raise _fail(f"bits must be 2, 4 or 8, got {b}")
    if _bool(signed, "signed"):
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


def _scale_arr(scale, name: str = "scale") -> np.ndarray:
    try:
        s = np.asarray(scale)
    except Exception:  # pragma: no cover - exotic objects
        raise _fail(f"{name} must be array-like") from None
    if s.dtype.kind not in "fiu" or s.dtype.kind == "b":
        raise _fail(f"{name} must be a floating array, got dtype {s.dtype}")
    return np.ascontiguousarray(s, dtype=np.float32)


def _zp_arr(zero_point, shape: tuple, name: str = "zero_point") -> np.ndarray:
    if zero_point is None:
        return np.zeros(shape, dtype=np.int32)
    try:
        z = np.asarray(zero_point)
    except Exception:  # pragma: no cover
        raise _fail(f"{name} must be array-like") from None
    if z.dtype.kind not in "iu":
        raise _fail(f"{name} must be an integer array, got dtype {z.dtype}")
    if z.size and (int(z.min()) < -(2**31) or int(z.max()) >= 2**31):
        raise _fail(f"{name} out of int32 range")
    return np.ascontiguousarray(z, dtype=np.int32)


def _param_layout(x_shape: tuple, axis, block_size, s_shape: tuple, what: str):
    """-> (mode, outer, alen, inner, block, expected param shape)"""
    n = math.prod(x_shape)
    if block_size is not None:
        if axis is None:
            raise _fail("block_size needs an axis")
        if len(x_shape) == 0:
            raise _fail("blocked quantization needs an array of rank >= 1")
        ax = _axis(axis, len(x_shape))
        bs = _int(block_size, "block_size", 1)
        o, a, i = _split(x_shape, ax)
        nb = -(-a // bs)
        exp = tuple(nb if d == ax else x_shape[d] for d in range(len(x_shape)))
        return lib.FW_MODE_BLOCK, o, a, i, bs, exp
    if axis is None or len(s_shape) == 0 or (what == "quantize" and s_shape == (1,) and axis is None):
        return lib.FW_MODE_TENSOR, 1, 1, n, 1, s_shape if len(s_shape) == 0 else (1,)
    if len(x_shape) == 0:
        raise _fail("axis given for a 0-d array")
    ax = _axis(axis, len(x_shape))
    o, a, i = _split(x_shape, ax)
    return lib.FW_MODE_AXIS, o, a, i, 1, (a,)


def _layout_for(x_shape, axis, block_size, scale, zero_point, what):
    s = _scale_arr(scale)
    if axis is None and block_size is None and s.size != 1:
        raise _fail(f"per-tensor {what} needs a scalar scale (got shape {s.shape}); pass axis")
    mode, o, a, i, bs, exp = _param_layout(x_shape, axis, block_size, s.shape, what)
    if mode == lib.FW_MODE_TENSOR:
        if s.size != 1:
            raise _fail(f"scale must be a scalar, got shape {s.shape}")
    elif s.shape != tuple(exp):
        raise _fail(f"scale shape {s.shape} does not match the expected {tuple(exp)}")
    z = _zp_arr(zero_point, s.shape)
    if z.shape != s.shape:
        if z.size == 1 and s.size == 1:
            z = z.reshape(s.shape)
        else:
            raise _fail(f"zero_point shape {z.shape} does not match scale shape {s.shape}")
    return mode, o, a, i, bs, s, z
