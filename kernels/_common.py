"""Wrappers of common.c: the worker-thread cap, the finite min / max scan, and a threaded memcpy
(the bandwidth reference of the kernel benchmark)."""

from __future__ import annotations

import numpy as np

from kernels._args import _check, _data, _fail, _int, _ptr, _wptr
from kernels._load import ffi, lib


def threads() -> int:
    return int(lib.fw_get_threads())


def set_threads(n: int | None) -> int:
    """Cap the worker threads (None or <= 0: FW_KERNELS_THREADS or all cores); returns the old."""
    old = threads()
    lib.fw_set_threads(0 if n is None else _int(n, "n", -(2**31), 2**31 - 1))
    return old


def _memcpy(dst: np.ndarray, src: np.ndarray) -> None:
    """Threaded memcpy between equally sized contiguous arrays (benchmark reference)."""
    if not (dst.flags.c_contiguous and src.flags.c_contiguous) or dst.nbytes != src.nbytes:
        raise _fail("memcpy needs contiguous arrays of equal size")
    _check(lib.fw_memcpy(_wptr("char[]", dst), _ptr("char[]", src), dst.nbytes))


def minmax(x: np.ndarray) -> tuple[float, float, int]:
    """(min, max, count) over the finite values of a float32 array (inf, -inf, 0 when none)."""
    x = _data(x, np.float32, "x")
    mn = ffi.new("float *")
    mx = ffi.new("float *")
    cnt = ffi.new("int64_t *")
    _check(lib.fw_minmax_finite(_ptr("float[]", x), x.size, mn, mx, cnt))
    return float(mn[0]), float(mx[0]), int(cnt[0])
