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


# ---------------------------------------------------------------------------------- selection


def abs_sort_key(x: np.ndarray) -> np.ndarray:
    """|x| ordered like the kernels: NaN after +Inf (numpy's sort order)."""
    return np.sort(np.abs(x.astype(np.float32)).reshape(-1))


def nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    wm = np.moveaxis(w, axis, -1)
    shp = wm.shape
    g = wm.reshape(shp[:-1] + (shp[-1] // m, m))
    key = np.abs(g.astype(np.float64))
    key = np.where(np.isnan(key), -1.0, key)
    order = np.argsort(-key, axis=-1, kind="stable")
    keep = np.zeros(g.shape, dtype=np.uint8)
    np.put_along_axis(keep, order[..., :n], 1, axis=-1)
    return np.moveaxis(keep.reshape(shp), -1, axis)


def channel_norms(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    a = w.shape[axis]
    wm = np.moveaxis(w.astype(np.float64), axis, 0).reshape(a, w.size // a if a else 0)
    if p == 1:
        return np.abs(wm).sum(axis=1)
    return np.sqrt((wm * wm).sum(axis=1))


# ---------------------------------------------------------------------------------- histograms


def histogram(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    x = x.reshape(-1).astype(np.float32)
    x = x[~np.isnan(x)]
    scale = np.float32(bins) / (np.float32(hi) - np.float32(lo))
    with np.errstate(all="ignore"):
        t = ((x - np.float32(lo)) * scale).astype(np.float32)
    t = np.clip(t, 0, bins - 1)
    return np.bincount(np.floor(t).astype(np.int64), minlength=bins).astype(np.int64)


def percentile(counts, lo, hi, p):
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    target = p / 100.0 * total
    width = (hi - lo) / counts.size
    cum = 0.0
    for b, c in enumerate(counts):
        if c == 0:
            continue
        if cum + c >= target:
            frac = min(max((target - cum) / c, 0.0), 1.0)
            return lo + (b + frac) * width
        cum += c
    nz = np.nonzero(counts)[0]
    return lo + (nz[-1] + 1) * width


def _smooth(d, eps=0.0001):
    d = d.astype(np.float64).copy()
    zero = d == 0
    nz, nnz = zero.sum(), d.size - zero.sum()
    if nnz == 0:
        return None
    d += np.where(zero, eps, -eps * nz / nnz)
    if (d <= 0).any():
        return None
    return d


def entropy_threshold(counts, hi, nq, folded: bool):
    c = np.asarray(counts, np.float64)
    if folded:
        h2 = c.size // 2
        c = c[h2:] + c[:h2][::-1]
    nb = c.size
    width = hi / nb
    if nb <= nq:
        return hi
    best, best_i = math.inf, nb
    for i in range(nq, nb + 1):
        p = c[:i].copy()
        p[i - 1] += c[i:].sum()
        merged = i // nq
        q = np.zeros(i)
        for j in range(nq):
            s = j * merged
            e = i if j == nq - 1 else s + merged
            nzc = (p[s:e] != 0).sum()
            val = c[s:e].sum() / nzc if nzc else 0.0
            q[s:e] = np.where(p[s:e] != 0, val, 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            kl = math.inf
        else:
            pn, qn = ps / ps.sum(), qs / qs.sum()
            kl = float((pn * np.log(pn / qn)).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i * width


# ---------------------------------------------------------------------------------- GPTQ


def gptq(w, u, scale, zp, qmin, qmax, group=None):
    """Unblocked GPTQ sweep in float64 (the algorithm's definition)."""
    W = w.astype(np.float64).copy()
    U = u.astype(np.float64)
    rows, cols = W.shape
    Q = np.zeros((rows, cols), np.int64)
    What = np.zeros((rows, cols), np.float64)
    for i in range(cols):
        if group is None:
            s = scale.astype(np.float64)
            z = zp.astype(np.float64)
        else:
            s = scale[:, i // group].astype(np.float64)
            z = zp[:, i // group].astype(np.float64)
        q = np.clip(np.rint(W[:, i] / s) + z, qmin, qmax)
        dq = (q - z) * s
        Q[:, i] = q
        What[:, i] = dq
        err = (W[:, i] - dq) / U[i, i]
        W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
    return Q, What


def sparsegpt(w, u, sparsity, n=0, m=0, block=128):
    """Blocked SparseGPT in float64 with the kernels' selection rules."""
    W = w.astype(np.float64).copy()
    U = u.astype(np.float64)
    rows, cols = W.shape
    mask = np.ones((rows, cols), np.uint8)
    d = np.diag(U)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        kb = c1 - c0
        pruned = np.zeros((rows, kb), bool)
        if not m:
            k = int(math.floor(sparsity * rows * kb))
            if k:
                sc = (W[:, c0:c1] ** 2 / d[c0:c1] ** 2).reshape(-1)
                # rank ascending by (score, -index): ties prune the higher flat index first
                order = np.lexsort((-np.arange(sc.size), sc))
                flat = np.zeros(sc.size, bool)
                flat[order[:k]] = True
                pruned = flat.reshape(rows, kb)
        for i in range(c0, c1):
            if m and (i - c0) % m == 0:
                sc = W[:, i : i + m] ** 2 / d[i : i + m] ** 2
                order = np.argsort(-sc, axis=1, kind="stable")
                keep = np.zeros_like(sc, bool)
                np.put_along_axis(keep, order[:, :n], True, axis=1)
                pruned[:, i - c0 : i - c0 + m] = ~keep
            wv = W[:, i].copy()
            q = np.where(pruned[:, i - c0], 0.0, wv)
            mask[:, i] = ~pruned[:, i - c0]
            err = (wv - q) / U[i, i]
            W[:, i] = q
            W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
    return W, mask


def hinv_chol(rows_x: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of H^-1 for H = 2 X^T X (+ damping), as GPTQ computes it."""
    X = rows_x.astype(np.float64)
    H = 2 * X.T @ X
    H += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    Hinv = np.linalg.inv(H)
    L = np.linalg.cholesky(Hinv)
    return L.T.astype(np.float32)
