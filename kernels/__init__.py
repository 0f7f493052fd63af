"""Featherweight's C kernel library (cffi, out-of-line API mode): numpy in, numpy out.

Every function checks dtype, shape, contiguity and ranges before calling C and raises
`KernelError` (a ValueError) carrying the C message on bad input; no argument can crash the
process. See kernels/README.md for the API contract.
"""

from __future__ import annotations

import contextlib
import glob
import math
import operator
import os
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "KernelError",
    "Histogram",
    "apply_mask",
    "channel_norms",
    "choose_qparams",
    "dequantize",
    "entropy_threshold",
    "gptq_quantize",
    "histogram",
    "isa",
    "isa_supported",
    "kmeans1d",
    "kth_smallest_abs",
    "magnitude_mask",
    "minmax",
    "nm_mask",
    "pack",
    "pack_signs",
    "percentile_from_histogram",
    "quantize",
    "set_isa",
    "set_threads",
    "sign_quantize",
    "sparsegpt_prune",
    "threads",
    "unpack",
    "unpack_signs",
    "use_isa",
]

_ABI_VERSION = 3


class KernelError(ValueError):
    """Bad argument (or a failure) reported by the kernel library; carries the C message."""


# --------------------------------------------------------------------------------------- loading

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_newer_than(so_path: str) -> bool:
    so_m = os.path.getmtime(so_path)
    patterns = ("src/*.c", "src/*.h", "include/*.h", "build_ffi.py")
    for pat in patterns:
        for p in glob.glob(os.path.join(_HERE, pat)):
            if os.path.getmtime(p) > so_m:
                return True
    return False


def _maybe_build() -> None:
    """In a source checkout (setup.py next to the package), compile the extension in place when it
    is missing or older than the C sources. Installed packages are never rebuilt."""
    if os.environ.get("FW_KERNELS_NO_AUTOBUILD"):
        return
    root = os.path.dirname(_HERE)
    if not (
        os.path.exists(os.path.join(root, "setup.py"))
        and os.path.exists(os.path.join(_HERE, "build_ffi.py"))
        and os.path.isdir(os.path.join(_HERE, "src"))
    ):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fw_kernels_build_ffi",
                                                  os.path.join(_HERE, "build_ffi.py"))
    build_ffi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ffi)  # type: ignore[union-attr]

    def stale() -> bool:
        so = build_ffi.built_module_path()
        return so is None or _sources_newer_than(so)

    if not stale():
        return
    import fcntl

    lock_dir = os.path.join(root, "build")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".kernels-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        still_stale = stale()
    if still_stale:  # (build_inplace takes the lock itself; a build that won the race is reused)
        build_ffi.build_inplace()


try:
    _maybe_build()
except Exception as exc:  # pragma: no cover - fall through to the import error below
    warnings.warn(f"kernels: in-place build failed: {exc}", RuntimeWarning, stacklevel=2)

try:
    from kernels._ffi import ffi, lib  # noqa: E402
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "kernels._ffi is not built: run `pip install -e .` or `python kernels/build_ffi.py`"
    ) from exc

if lib.fw_abi_version() != _ABI_VERSION:  # pragma: no cover
    raise ImportError(
        f"kernels._ffi ABI {lib.fw_abi_version()} != {_ABI_VERSION}: rebuild with "
        "`python kernels/build_ffi.py` (or `pip install -e .`)"
    )

_env_isa = os.environ.get("FW_KERNELS_ISA", "").strip()
if _env_isa and _env_isa != "auto" and ffi.string(lib.fw_isa()).decode() != _env_isa:
    warnings.warn(
        f"FW_KERNELS_ISA={_env_isa!r} is not supported here; using "
        f"{ffi.string(lib.fw_isa()).decode()!r}",
        RuntimeWarning,
        stacklevel=2,
    )


# --------------------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------------------- state


def isa() -> str:
    """The primitive variant in use: 'ref', 'avx2', 'avx512' or 'neon'."""
    return ffi.string(lib.fw_isa()).decode()


def isa_supported(name: str) -> bool:
    return bool(lib.fw_isa_supported(str(name).encode()))


def set_isa(name: str) -> str:
    """Switch the variant at run time ('auto', 'ref', 'avx2', 'avx512', 'neon'); returns the old."""
    old = isa()
    _check(lib.fw_set_isa(str(name).encode()))
    return old


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    old = set_isa(name)
    try:
        yield isa()
    finally:
        lib.fw_set_isa(old.encode())


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


# --------------------------------------------------------------------------------------- quantization


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


# --------------------------------------------------------------------------------------- sign


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


# --------------------------------------------------------------------------------------- selection


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


# --------------------------------------------------------------------------------------- clustering

_KMEANS_INIT = {"kmeans++": 0, "quantile": 1}


def kmeans1d(x, k, *, init="kmeans++", iters=50, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float32[k] ascending, labels uint8 of x's shape). Lloyd iterations over all
    finite values; non-finite values do not move centroids (NaN and -Inf get label 0, +Inf k-1)."""
    x = _data(x, np.float32, "x")
    kk = _int(k, "k", 1, 256)
    if init not in _KMEANS_INIT:
        raise _fail(f"init must be one of {sorted(_KMEANS_INIT)}, got {init!r}")
    it = _int(iters, "iters", 0, 100000)
    sd = _int(seed, "seed", 0, 2**64 - 1)  # passed as uint64
    cent = np.zeros(kk, dtype=np.float32)
    labels = np.zeros(x.shape, dtype=np.uint8)
    _check(lib.fw_kmeans1d(_ptr("float[]", x), x.size, kk, _KMEANS_INIT[init], it, sd,
                           _wptr("float[]", cent), _wptr("uint8_t[]", labels)))
    return cent, labels


# --------------------------------------------------------------------------------------- histograms

_MAX_BINS = 1 << 22


def histogram(x, bins, lo, hi) -> np.ndarray:
    """int64[bins] counts over [lo, hi]: bin = floor((x - lo) * (bins / (hi - lo))) in float32,
    values outside clamp to the edge bins, NaN ignored."""
    x = _data(x, np.float32, "x")
    nb = _int(bins, "bins", 1, _MAX_BINS)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    counts = np.zeros(nb, dtype=np.int64)
    _check(lib.fw_histogram(_ptr("float[]", x), x.size, nb, flo, fhi, _wptr("int64_t[]", counts)))
    return counts


def _counts(counts) -> np.ndarray:
    c = np.asarray(counts)
    if c.dtype.kind not in "iu" or c.ndim != 1 or c.size == 0:
        raise _fail("counts must be a non-empty 1-D integer array")
    if c.size > _MAX_BINS:
        raise _fail(f"at most {_MAX_BINS} bins")
    if c.dtype == np.uint64 and c.size and int(c.max()) >= 2**63:
        raise _fail("counts too large")
    c = np.ascontiguousarray(c, dtype=np.int64)
    if (c < 0).any():
        raise _fail("counts must be >= 0")
    return c


def percentile_from_histogram(counts, lo, hi, p) -> float:
    """The value below which p% of the histogram's mass lies (linear within a bin)."""
    c = _counts(counts)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    pp = _float(p, "p")
    out = ffi.new("double *")
    _check(lib.fw_percentile(_ptr("int64_t[]", c), c.size, flo, fhi, pp, out))
    return float(out[0])


def entropy_threshold(counts, lo, hi, num_quant_bins=128) -> float:
    """TensorRT-style KL-divergence threshold on |x| from a histogram of |x| over [0, hi] or of x
    over [-hi, hi] (even bin count; folded)."""
    c = _counts(counts)
    flo, fhi = _float(lo, "lo"), _float(hi, "hi")
    nq = _int(num_quant_bins, "num_quant_bins", 2, _MAX_BINS)
    out = ffi.new("double *")
    _check(lib.fw_entropy_threshold(_ptr("int64_t[]", c), c.size, flo, fhi, nq, out))
    return float(out[0])


class Histogram:
    """Streaming activation histogram over a symmetric range [-R, R] that grows as data arrives.

    The first update with a finite non-zero value sets R to its max |x|; a later value beyond R
    doubles R (merging bin pairs, exact) until it fits. `bins` must be a multiple of 4.
    `percentile(p)` is over x; `abs_percentile(p)` and `entropy_threshold()` are over |x|.
    """

    def __init__(self, bins: int = 2048):
        nb = _int(bins, "bins", 4, _MAX_BINS)
        if nb % 4:
            raise _fail(f"bins must be a multiple of 4, got {nb}")
        self.bins = nb
        self.counts = np.zeros(nb, dtype=np.int64)
        self.range = 0.0  # R; 0 until a non-zero finite value is seen
        self._pending_zeros = 0
        self._min = math.inf
        self._max = -math.inf
        self.count = 0  # values binned (NaN excluded)

    @property
    def lo(self) -> float:
        return -self.range

    @property
    def hi(self) -> float:
        return self.range

    def update(self, x) -> "Histogram":
        x = _data(x, np.float32, "x")
        if x.size == 0:
            return self
        mn, mx, nfin = minmax(x)
        if nfin:
            self._min = min(self._min, mn)
            self._max = max(self._max, mx)
            amax = max(-mn, mx)
        else:
            amax = 0.0
        if self.range == 0.0:
            if amax == 0.0:
                # nothing to size the range with yet: only zeros (and maybe +-Inf)
                nnan = int(np.isnan(x).sum())
                ninf = int(np.isinf(x).sum())
                if ninf:
                    raise _fail("Histogram: the first non-zero values are infinite")
                self._pending_zeros += x.size - nnan
                self.count += x.size - nnan
                return self
            self.range = float(np.float32(amax))
            if self._pending_zeros:
                self.counts[self.bins // 2] += self._pending_zeros
                self._pending_zeros = 0
        while amax > self.range:
            if not math.isfinite(self.range * 2) or self.range * 2 > 3.0e38:
                break
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            q = self.bins // 4
            self.counts[q : 3 * q] = merged
            self.range *= 2.0
        add = histogram(x, self.bins, -self.range, self.range)
        self.counts += add
        self.count += int(add.sum())
        return self

    def minmax(self) -> tuple[float, float]:
        """(min, max) of the finite values seen ((inf, -inf) before any)."""
        return self._min, self._max

    def _view(self) -> tuple[np.ndarray, float]:
        if self.range == 0.0:
            # only zeros so far: a degenerate histogram with all the mass at 0
            c = np.zeros(self.bins, dtype=np.int64)
            c[self.bins // 2] = self._pending_zeros
            return c, 1.0
        return self.counts, self.range

    def abs_counts(self) -> np.ndarray:
        """The histogram of |x| over [0, R] (bins // 2 bins)."""
        c, _ = self._view()
        h = self.bins // 2
        return c[h:] + c[:h][::-1]

    def percentile(self, p) -> float:
        c, r = self._view()
        if self.range == 0.0 and self._pending_zeros:
            return 0.0
        return percentile_from_histogram(c, -r, r, p)

    def abs_percentile(self, p) -> float:
        if self.range == 0.0 and self._pending_zeros:
            return 0.0
        return percentile_from_histogram(self.abs_counts(), 0.0, self._view()[1], p)

    def entropy_threshold(self, num_quant_bins=128) -> float:
        if self.range == 0.0:
            if self._pending_zeros:
                return 0.0
            raise _fail("Histogram is empty")
        return entropy_threshold(self.abs_counts(), 0.0, self.range, num_quant_bins)


# --------------------------------------------------------------------------------------- GPTQ


def _hinv(hinv_chol, cols: int) -> np.ndarray:
    u = np.asarray(hinv_chol) if not isinstance(hinv_chol, np.ndarray) else hinv_chol
    if u.dtype.kind != "f":
        raise _fail(f"hinv_chol must be a floating array, got dtype {u.dtype}")
    if u.shape != (cols, cols):
        raise _fail(f"hinv_chol shape {u.shape} != ({cols}, {cols})")
    return np.ascontiguousarray(u, dtype=np.float32)


def gptq_quantize(w, hinv_chol, scale, zero_point, *, bits, signed, group_size=None,
                  block=128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ column sweep: (q int8/uint8 [rows, cols], w_hat float32 [rows, cols] = dequantized q).
    w [rows=outputs, cols=inputs] float32; hinv_chol the upper Cholesky factor of H^-1 (only the
    upper triangle is read; converted to float32); scale / zero_point [rows] or
    [rows, ceil(cols / group_size)]. Non-finite w or hinv_chol, or a non-positive diagonal, raise."""
    w = _data(w, np.float32, "w")
    if w.ndim != 2:
        raise _fail(f"w must be 2-D [rows, cols], got shape {w.shape}")
    rows, cols = w.shape
    u = _hinv(hinv_chol, cols)
    qmin, qmax = _qrange(bits, signed)
    blk = _int(block, "block", 1)
    s = _scale_arr(scale)
    if group_size is None:
        g = 0
        if s.shape == (rows, 1):
            s = s.reshape(rows)
        if s.shape != (rows,):
            raise _fail(f"scale shape {s.shape} != ({rows},)")
    else:
        g = _int(group_size, "group_size", 1)
        ng = -(-cols // g)
        if s.shape != (rows, ng):
            raise _fail(f"scale shape {s.shape} != ({rows}, {ng})")
    z = _zp_arr(zero_point, s.shape)
    if z.size == 1 and s.size == 1:
        z = z.reshape(s.shape)
    if z.shape != s.shape:
        raise _fail(f"zero_point shape {z.shape} != scale shape {s.shape}")
    work = np.array(w, dtype=np.float32, order="C", copy=True)
    q = np.empty((rows, cols), dtype=np.int8 if qmin < 0 else np.uint8)
    if w.size == 0:
        return q, work
    _check(
        lib.fw_gptq_quantize(
            _wptr("float[]", work), rows, cols, _ptr("float[]", u), _ptr("float[]", s),
            _ptr("int32_t[]", z), g, qmin, qmax, blk, _wptr("uint8_t[]", q),
            _wptr("float[]", work),
        )
    )
    return q, work


def sparsegpt_prune(w, hinv_chol, *, sparsity, n=0, m=0, block=128) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT: (w_hat float32, mask uint8 (1 = kept)). Unstructured: in every column block,
    floor(sparsity * rows * block_cols) weights with the smallest w^2 / d^2 are pruned (ties: the
    lower flat index is kept). N:M (n, m > 0): in every group of m columns the n with the largest
    scores are kept, per row; `sparsity` is then ignored. Errors propagate through hinv_chol."""
    w = _data(w, np.float32, "w")
    if w.ndim != 2:
        raise _fail(f"w must be 2-D [rows, cols], got shape {w.shape}")
    rows, cols = w.shape
    u = _hinv(hinv_chol, cols)
    sp = _float(sparsity, "sparsity")
    if not 0.0 <= sp <= 1.0:
        raise _fail(f"sparsity must be in [0, 1], got {sp}")
    nn = _int(n, "n", 0)
    mm = _int(m, "m", 0, 256)
    blk = _int(block, "block", 1)
    if (nn > 0) != (mm > 0):
        raise _fail("n and m must both be > 0 (N:M) or both 0 (unstructured)")
    if mm:
        if nn > mm:
            raise _fail(f"n={nn} > m={mm}")
        if cols % mm:
            raise _fail(f"cols={cols} is not divisible by m={mm}")
        if blk % mm:
            raise _fail(f"block={blk} is not a multiple of m={mm}")
    work = np.array(w, dtype=np.float32, order="C", copy=True)
    mask = np.ones((rows, cols), dtype=np.uint8)
    if w.size == 0:
        return work, mask
    _check(
        lib.fw_sparsegpt_prune(
            _wptr("float[]", work), rows, cols, _ptr("float[]", u), sp, nn, mm, blk,
            _wptr("float[]", work), _wptr("uint8_t[]", mask),
        )
    )
    return work, mask
