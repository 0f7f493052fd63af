"""Wrappers of select.c: the k-th smallest magnitude, magnitude / N:M masks, masking, channel norms,
and sign quantization with its bit packing."""

from __future__ import annotations

import math

import numpy as np

from kernels._args import _axis, _check, _data, _fail, _float, _int, _out, _ptr, _split, _wptr
from kernels._load import ffi, lib


def sign_quantize(w, *, axis) -> tuple[np.ndarray, np.ndarray]:
    """(signs int8 in {-1, +1} (0, -0 and NaN -> +1), alpha float32[w.shape[axis]] = mean |w| over
    the other axes; 0 for an empty slice)."""
    w = _data(w, np.float32, "w")
    if w.ndim == 0:
        raise _fail("sign_quantize needs an array of rank >= 1")
    ax = _axis(axis, w.ndim)
    o, a, i = _split(w.shape, ax)
    signs = np.empty(w.shape, dtype=np.int8)
    alpha = np.empty(a, dtype=np.float32)
    if w.size == 0:
        alpha[:] = 0
        return signs, alpha
    _check(lib.fw_sign_quantize(_ptr("float[]", w), o, a, i, _wptr("int8_t[]", signs),
                                _wptr("float[]", alpha)))
    return signs, alpha


def pack_signs(signs) -> np.ndarray:
    """One bit per sign (flattened, C order), LSB first: bit 1 = +1, bit 0 = -1."""
    s = _data(signs, np.int8, "signs")
    out = np.empty((s.size + 7) // 8, dtype=np.uint8)
    _check(lib.fw_pack_signs(_ptr("int8_t[]", s), s.size, _wptr("uint8_t[]", out), out.size))
    return out


def unpack_signs(packed, count) -> np.ndarray:
    packed = _data(packed, np.uint8, "packed")
    c = _int(count, "count", 0, 2**62)
    out = np.empty(c, dtype=np.int8)
    _check(lib.fw_unpack_signs(_ptr("uint8_t[]", packed), packed.size, c, _wptr("int8_t[]", out)))
    return out




def kth_smallest_abs(arrays, k) -> float:
    """The k-th smallest |w| (1-based) over all the arrays together, O(n); NaN sorts after +Inf."""
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    try:
        arrs = [_data(a, np.float32, f"arrays[{j}]") for j, a in enumerate(arrays)]
    except TypeError:
        raise _fail("arrays must be a float32 array or a sequence of them") from None
    total = sum(a.size for a in arrs)
    kk = _int(k, "k")
    if not 1 <= kk <= total:
        raise _fail(f"k must be in [1, {total}], got {kk}")
    arrs = [a for a in arrs if a.size]
    bufs = [_ptr("float[]", a) for a in arrs]
    ptrs = ffi.new("float *[]", len(bufs))
    for j, b in enumerate(bufs):
        ptrs[j] = b
    lens = ffi.new("int64_t[]", [a.size for a in arrs])
    out = ffi.new("float *")
    _check(lib.fw_kth_smallest_abs(ptrs, lens, len(arrs), kk, out))
    return float(out[0])


def _threshold32(threshold) -> np.float32:
    """float32 t with (|w| > t) == (|w| > threshold) for every float32 w (rounds down)."""
    t = _float(threshold, "threshold", finite=False)
    f = np.float32(t)
    if not math.isnan(t) and float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf))
    return f


def magnitude_mask(w, threshold, *, out=None) -> np.ndarray:
    """uint8 mask, 1 where |w| > threshold (NaN -> 0). `out`: an existing uint8 array of w's
    shape to write into (returned), not overlapping w."""
    w = _data(w, np.float32, "w")
    t = _threshold32(threshold)
    out = _out(out, np.uint8, w.shape, [w])
    if w.size:
        _check(lib.fw_magnitude_mask(_ptr("float[]", w), w.size, float(t),
                                     _wptr("uint8_t[]", out)))
    return out


def apply_mask(w, mask, *, out=None) -> np.ndarray:
    """float32 copy of w with +0.0 where mask == 0 (mask uint8 or bool, w's shape). `out`: an
    existing float32 array of w's shape to write into (returned); it may be w itself (masking in
    place) but must not overlap mask or w otherwise."""
    w = _data(w, np.float32, "w")
    m = _data(mask, np.uint8, "mask", [np.uint8, np.bool_])
    if m.shape != w.shape:
        raise _fail(f"mask shape {m.shape} != w shape {w.shape}")
    out = _out(out, np.float32, w.shape, [w, m], same_ok=w)
    if w.size:
        _check(lib.fw_apply_mask(_ptr("float[]", w), _ptr("uint8_t[]", m.view(np.uint8)), w.size,
                                 _wptr("float[]", out)))
    return out


def nm_mask(w, n, m, *, axis) -> np.ndarray:
    """uint8 mask keeping the n largest |w| of every m consecutive elements along axis
    (ties: the lower index is kept; NaN ranks below every number)."""
    w = _data(w, np.float32, "w")
    if w.ndim == 0:
        raise _fail("nm_mask needs an array of rank >= 1")
    ax = _axis(axis, w.ndim)
    mm = _int(m, "m", 1, 256)
    nn = _int(n, "n", 1, mm)
    o, a, i = _split(w.shape, ax)
    if a % mm:
        raise _fail(f"axis length {a} is not divisible by m={mm}")
    out = np.empty(w.shape, dtype=np.uint8)
    if w.size:
        _check(lib.fw_nm_mask(_ptr("float[]", w), o, a, i, nn, mm, _wptr("uint8_t[]", out)))
    return out


def channel_norms(w, *, axis, p) -> np.ndarray:
    """float32[w.shape[axis]]: L1 (p=1) or L2 (p=2) norm of each slice along axis (double
    accumulation in a fixed order; NaN / Inf propagate)."""
    w = _data(w, np.float32, "w")
    if w.ndim == 0:
        raise _fail("channel_norms needs an array of rank >= 1")
    ax = _axis(axis, w.ndim)
    pp = _int(p, "p")
    if pp not in (1, 2):
        raise _fail(f"p must be 1 or 2, got {pp}")
    o, a, i = _split(w.shape, ax)
    out = np.zeros(a, dtype=np.float32)
    if w.size:
        _check(lib.fw_channel_norms(_ptr("float[]", w), o, a, i, pp, _wptr("float[]", out)))
    return out
