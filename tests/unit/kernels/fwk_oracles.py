"""numpy oracles for the kernel tests (written independently of the C code)."""

from __future__ import annotations

import math

import numpy as np


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def expand_params(p: np.ndarray, shape: tuple, axis, block_size) -> np.ndarray:
    """Broadcast ONNX-layout parameters to x's shape."""
    p = np.asarray(p)
    if block_size is not None:
        ax = axis % len(shape)
        r = np.repeat(p, block_size, axis=ax)
        idx = [slice(None)] * len(shape)
        idx[ax] = slice(0, shape[ax])
        return r[tuple(idx)]
    if axis is None or p.ndim == 0 or p.size == 1 and axis is None:
        return np.broadcast_to(p.reshape(()), shape)
    ax = axis % len(shape)
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    return np.broadcast_to(p.reshape(bshape), shape)


def quantize(x, scale, zp, bits, signed, axis=None, block_size=None) -> np.ndarray:
    qmin, qmax = qrange(bits, signed)
    s = expand_params(np.asarray(scale, np.float32), x.shape, axis, block_size)
    z = expand_params(np.asarray(zp, np.int32), x.shape, axis, block_size).astype(np.float32)
    with np.errstate(all="ignore"):
        v = (x / s).astype(np.float32)
        r = np.rint(v) + z
        r = np.where(np.isnan(v), z, r)
        r = np.clip(r, qmin, qmax)
    return r.astype(np.int32).astype(np.int8 if signed else np.uint8)


def dequantize(q, scale, zp, axis=None, block_size=None) -> np.ndarray:
    s = expand_params(np.asarray(scale, np.float32), q.shape, axis, block_size)
    z = expand_params(np.asarray(zp, np.int32), q.shape, axis, block_size)
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    flat = q.reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    out = np.zeros((flat.size * bits + 7) // 8, dtype=np.uint8)
    for i, v in enumerate(flat):
        out[(i * bits) // 8] |= np.uint8(int(v) << ((i * bits) % 8))
    return out


def unpack(packed: np.ndarray, bits: int, signed: bool, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        v = (int(packed[(i * bits) // 8]) >> ((i * bits) % 8)) & ((1 << bits) - 1)
        if signed and v >= 1 << (bits - 1):
            v -= 1 << bits
        out[i] = v
    return out.astype(np.int8 if signed else np.uint8)


def qparams_from_range(lo, hi, symmetric, qmin, qmax):
    lo = np.float32(lo)
    hi = np.float32(hi)
    f32 = np.float32
    with np.errstate(all="ignore"):
        if symmetric:
            amax = max(-lo, hi)
            zc = 0 if qmin < 0 else (qmax + 1) // 2
            s = f32(amax / f32(qmax - zc))
            if not s > 0:
                s = f32(1.0)
            if s > np.finfo(np.float32).max:
                s = np.finfo(np.float32).max
            return s, zc
        s = f32((hi - lo) / f32(qmax - qmin))
        if not s > 0:
            s = f32(1.0)
        if s > np.finfo(np.float32).max:
            s = np.finfo(np.float32).max
        z = np.rint(f32(f32(qmin) - f32(lo / s)))
        return s, int(np.clip(z, qmin, qmax))


def qerr(x, s, z, qmin, qmax) -> float:
    x = x[np.isfinite(x)]
    with np.errstate(all="ignore"):
        r = np.clip(np.rint((x / np.float32(s)).astype(np.float32)) + np.float32(z), qmin, qmax)
        d = ((r - np.float32(z)) * np.float32(s)).astype(np.float32)
    e = d.astype(np.float64) - x.astype(np.float64)
    return float((e * e).sum())


def slice_params(vals: np.ndarray, symmetric, qmin, qmax, method):
    fin = vals[np.isfinite(vals)]
    lo = min(float(fin.min()), 0.0) if fin.size else 0.0
    hi = max(float(fin.max()), 0.0) if fin.size else 0.0
    s, z = qparams_from_range(lo, hi, symmetric, qmin, qmax)
    if method != "mse" or (lo == 0.0 and hi == 0.0):
        return s, z, None
    errs = []
    for c in range(100):
        a = np.float32(100 - c) / np.float32(100)
        cs, cz = qparams_from_range(a * np.float32(lo), a * np.float32(hi), symmetric, qmin, qmax)
        errs.append((qerr(vals, cs, cz, qmin, qmax), cs, cz))
    return s, z, errs


def choose_qparams(x, bits, symmetric, signed, axis, block_size, method):
    """-> (scale, zp, errs-per-slice or None)"""
    qmin, qmax = qrange(bits, signed)
    if axis is None and block_size is None:
        s, z, e = slice_params(x.reshape(-1), symmetric, qmin, qmax, method)
        return np.float32(s), np.int32(z), [e]
    ax = axis % x.ndim
    xm = np.moveaxis(x, ax, 0)  # [alen, ...rest]
    if block_size is None:
        res = [slice_params(xm[a].reshape(-1), symmetric, qmin, qmax, method) for a in range(x.shape[ax])]
        return (np.array([r[0] for r in res], np.float32), np.array([r[1] for r in res], np.int32),
                [r[2] for r in res])
    nb = -(-x.shape[ax] // block_size)
    shp = list(x.shape)
    shp[ax] = nb
    S = np.empty(shp, np.float32)
    Z = np.empty(shp, np.int32)
    E = np.empty(shp, dtype=object)
    Sm = np.moveaxis(S, ax, 0)
    Zm = np.moveaxis(Z, ax, 0)
    Em = np.moveaxis(E, ax, 0)
    for b in range(nb):
        blk = xm[b * block_size : (b + 1) * block_size]  # [bs, ...rest]
        rest = blk.shape[1:]
        for idx in np.ndindex(*rest):
            vals = blk[(slice(None),) + idx]
            s, z, e = slice_params(vals, symmetric, qmin, qmax, method)
            Sm[(b,) + idx] = s
            Zm[(b,) + idx] = z
            Em[(b,) + idx] = e
    return S, Z, list(E.reshape(-1))
