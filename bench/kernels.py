"""Kernel benchmark (not a test): `python -m bench.kernels [--json] [--quick] [--only NAME,...]`.

For each kernel at realistic sizes (4096 x 4096 float32 weights; 16M-element activations), on one
thread and on all, in alternating rounds (best of N each, so a change in machine load hits every
contender alike), it reports:

* `seconds`, `gbps`: our kernel's wall time and bandwidth (bytes read + bytes written by the
  kernel's contract). Kernels that take `out=` (quantize, dequantize, magnitude_mask, apply_mask)
  write into a pre-faulted output buffer here, the way memcpy bandwidth is measured; the others
  return their (small or new) result as usual.
* `vs_memcpy`: `gbps` / the bandwidth of a threaded memcpy of 64 MB into a pre-faulted buffer
  (read + write bytes), same run, same thread count.
* `seconds_fresh`, `gbps_fresh`, `vs_memcpy_fresh`: the kernel returning a freshly allocated
  array (its page faults included, as in normal use) against a memcpy into a freshly allocated
  64 MB array (page faults included too). Same as `seconds` for kernels without `out=`.
* `vs_numpy`: numpy time / `seconds_fresh`: the numpy expression a numpy user would write
  (`np.abs(w) > t`, `np.histogram`, `np.partition`, ...), which allocates its results, against
  ours allocating ours. numpy is single-threaded except for BLAS (the GPTQ sweep's matmuls),
  which gets the same thread count as ours through threadpoolctl when installed.
* `vs_numpy_out`: for the `out=` kernels, the same numpy computation with every result and
  temporary written into pre-allocated, pre-faulted buffers through numpy's own `out=`
  arguments, against ours with `out=` (None for the others).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Callable

import numpy as np

import kernels as K

try:  # pragma: no cover - optional
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def best_time(fn: Callable[[], object], repeat: int, min_time: float = 0.0) -> float:
    fn()  # warm up (page faults, caches, thread start)
    best = float("inf")
    t_start = time.perf_counter()
    n = 0
    while n < repeat or (time.perf_counter() - t_start < min_time and n < 50):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


@contextlib.contextmanager
def blas_threads(n: int):
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=n):
        yield


# ------------------------------------------------------------------ numpy references


def np_quantize_axis0(x, s, z, qmin, qmax):
    return np.clip(np.rint(x / s[:, None]) + z[:, None], qmin, qmax).astype(np.int8)


def np_quantize_block(x, s, z, qmin, qmax, bs):
    r, c = x.shape
    xb = x.reshape(r, c // bs, bs)
    return np.clip(np.rint(xb / s[:, :, None]) + z[:, :, None], qmin, qmax).astype(np.int8).reshape(r, c)


def np_dequantize_axis0(q, s, z):
    return (q.astype(np.int32) - z[:, None]).astype(np.float32) * s[:, None]


def np_pack4(q):
    u = q.reshape(-1).view(np.uint8)
    return (u[0::2] & 0x0F) | (u[1::2] << 4)


def np_nm_mask(w, n, m):
    g = np.abs(w).reshape(-1, m)
    idx = np.argsort(-g, axis=1, kind="stable")[:, :n]
    out = np.zeros(g.shape, np.uint8)
    np.put_along_axis(out, idx, 1, axis=1)
    return out.reshape(w.shape)


def np_kmeans1d(x, k, iters):
    """The same algorithm in numpy: sort once, clusters = intervals between midpoints."""
    v = np.sort(x.reshape(-1))
    v64 = v.astype(np.float64)
    c = v[((np.arange(k) + 0.5) * v.size / k).astype(np.int64)].astype(np.float32)
    for _ in range(iters):
        mids = 0.5 * (c[:-1].astype(np.float64) + c[1:])
        e = np.concatenate([[0], np.searchsorted(v64, mids, side="right"), [v.size]])
        cnt = np.diff(e)
        sums = np.add.reduceat(v64, np.minimum(e[:-1], v.size - 1))
        nc = np.where(cnt > 0, sums / np.maximum(cnt, 1), c).astype(np.float32)
        nc.sort()
        if np.array_equal(nc, c):
            break
        c = nc
    mids = 0.5 * (c[:-1].astype(np.float64) + c[1:])
    return c, np.searchsorted(mids, x, side="left").astype(np.uint8)


def np_gptq(w, u, s, z, qmin, qmax, block=128):
    """GPTQ's lazy-batch column sweep (Frantar et al., Algorithm 1), numpy/BLAS."""
    W = w.copy()
    rows, cols = W.shape
    Q = np.zeros_like(W)
    sc = s[:, None]
    zc = z[:, None].astype(np.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            wcol = W1[:, i]
            q = (np.clip(np.rint(wcol[:, None] / sc) + zc, qmin, qmax) - zc) * sc
            q = q[:, 0]
            Q[:, i1 + i] = q
            err = (wcol - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ u[i1:i2, i2:]
    return Q


def np_memcpy(dst, src):
    np.copyto(dst, src)


# the same computations with numpy's out= arguments (pre-allocated temporaries and results)


def np_quantize_axis0_out(x, s, z, qmin, qmax, tmp, out):
    np.divide(x, s[:, None], out=tmp)
    np.rint(tmp, out=tmp)
    np.add(tmp, z[:, None], out=tmp, casting="unsafe")
    np.clip(tmp, qmin, qmax, out=tmp)
    np.copyto(out, tmp, casting="unsafe")


def np_quantize_block_out(x, s, z, qmin, qmax, bs, tmp, out):
    r, c = x.shape
    t3 = tmp.reshape(r, c // bs, bs)
    np.divide(x.reshape(r, c // bs, bs), s[:, :, None], out=t3)
    np.rint(t3, out=t3)
    np.add(t3, z[:, :, None], out=t3, casting="unsafe")
    np.clip(t3, qmin, qmax, out=t3)
    np.copyto(out, tmp, casting="unsafe")


def np_dequantize_axis0_out(q, s, z, tmp_i32, out):
    np.subtract(q, z[:, None], out=tmp_i32, dtype=np.int32)
    np.multiply(tmp_i32, s[:, None], out=out, dtype=np.float32, casting="unsafe")


def np_magnitude_mask_out(w, t, tmp, out):
    np.abs(w, out=tmp)
    np.greater(tmp, t, out=out)


def np_apply_mask_out(w, mask_bool, out):
    np.copyto(out, np.float32(0))
    np.copyto(out, w, where=mask_bool)


# ------------------------------------------------------------------ the run


def run(quick: bool = False, only: set[str] | None = None, log=sys.stderr) -> list[dict]:
    rng = np.random.default_rng(0)
    side = 1024 if quick else 4096
    nact = (1 << 20) if quick else (1 << 24)  # 16M activations
    W = (rng.standard_normal((side, side)) * 0.02).astype(np.float32)
    A = rng.standard_normal(nact).astype(np.float32)
    all_threads = K.set_threads(None)
    K.set_threads(all_threads)
    thread_counts = [1] if all_threads == 1 else [1, all_threads]

    s0, z0 = K.choose_qparams(W, bits=8, symmetric=True, axis=0)
    q0 = K.quantize(W, s0, z0, bits=8, signed=True, axis=0)
    sb, zb = K.choose_qparams(W, bits=4, symmetric=True, axis=1, block_size=32)
    q4 = K.quantize(W, sb, zb, bits=4, signed=True, axis=1, block_size=32)
    k_sel = A.size // 2
    t_sel = K.kth_smallest_abs(A, k_sel)
    mask = K.magnitude_mask(A, t_sel)
    Wg = W[: side // 4 * 4]
    # GPTQ problem: the Hessian of random calibration inputs
    X = rng.standard_normal((side * 2 if quick else side + 512, side)).astype(np.float32)
    H = (2.0 * (X.T @ X)).astype(np.float64)
    H += 0.01 * np.mean(np.diag(H)) * np.eye(side)
    U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32).copy()
    del X, H
    sg, zg = K.choose_qparams(W, bits=4, symmetric=True, axis=0)

    f = 4  # bytes per float
    n2 = W.size
    # pre-faulted output buffers for the out= runs (ours and numpy's)
    o_q8 = np.ones(W.shape, np.int8)
    o_deq = np.ones(W.shape, np.float32)
    o_mask = np.ones(A.shape, np.uint8)
    o_apply = np.ones(A.shape, np.float32)
    t_w32 = np.ones(W.shape, np.float32)
    t_wi32 = np.ones(W.shape, np.int32)
    t_a32 = np.ones(A.shape, np.float32)
    o_maskb = np.ones(A.shape, bool)
    mask_b = mask.view(bool)
    cases = [
        # name, ours, ours with out= (or None), numpy, numpy with out= (or None), bytes, repeats
        ("quantize_int8_axis", lambda: K.quantize(W, s0, z0, bits=8, signed=True, axis=0),
         lambda: K.quantize(W, s0, z0, bits=8, signed=True, axis=0, out=o_q8),
         lambda: np_quantize_axis0(W, s0, z0, -128, 127),
         lambda: np_quantize_axis0_out(W, s0, z0, -128, 127, t_w32, o_q8), n2 * (f + 1), 7),
        ("quantize_int4_block32",
         lambda: K.quantize(W, sb, zb, bits=4, signed=True, axis=1, block_size=32),
         lambda: K.quantize(W, sb, zb, bits=4, signed=True, axis=1, block_size=32, out=o_q8),
         lambda: np_quantize_block(W, sb, zb, -8, 7, 32),
         lambda: np_quantize_block_out(W, sb, zb, -8, 7, 32, t_w32, o_q8), n2 * (f + 1), 5),
        ("dequantize_int8_axis", lambda: K.dequantize(q0, s0, z0, axis=0),
         lambda: K.dequantize(q0, s0, z0, axis=0, out=o_deq),
         lambda: np_dequantize_axis0(q0, s0, z0),
         lambda: np_dequantize_axis0_out(q0, s0, z0, t_wi32, o_deq), n2 * (1 + f), 5),
        ("pack_int4", lambda: K.pack(q4, 4), None, lambda: np_pack4(q4), None, n2 + n2 // 2, 5),
        ("magnitude_mask", lambda: K.magnitude_mask(A, t_sel),
         lambda: K.magnitude_mask(A, t_sel, out=o_mask),
         lambda: np.abs(A) > t_sel,
         lambda: np_magnitude_mask_out(A, t_sel, t_a32, o_maskb), A.size * (f + 1), 7),
        ("apply_mask", lambda: K.apply_mask(A, mask),
         lambda: K.apply_mask(A, mask, out=o_apply),
         lambda: np.where(mask_b, A, np.float32(0)),
         lambda: np_apply_mask_out(A, mask_b, o_apply), A.size * (f + 1 + f), 5),
        ("histogram_2048", lambda: K.histogram(A, 2048, -4.0, 4.0), None,
         lambda: np.histogram(A, 2048, (-4.0, 4.0)), None, A.size * f, 5),
        ("channel_norms_l2", lambda: K.channel_norms(W, axis=0, p=2), None,
         lambda: np.linalg.norm(W, axis=1), None, n2 * f, 5),
        ("sign_quantize", lambda: K.sign_quantize(W, axis=0), None,
         lambda: (np.where(W < 0, -1, 1).astype(np.int8), np.abs(W).mean(axis=1)), None,
         n2 * (f + 1), 5),
        ("nm_mask_2_4", lambda: K.nm_mask(Wg, 2, 4, axis=1), None, lambda: np_nm_mask(Wg, 2, 4),
         None, Wg.size * (f + 1), 3),
        ("kth_smallest_abs", lambda: K.kth_smallest_abs(A, k_sel), None,
         lambda: np.partition(np.abs(A), k_sel - 1)[k_sel - 1], None, A.size * f, 7),
        ("kmeans1d_k16", lambda: K.kmeans1d(A, 16, init="quantile", iters=30), None,
         lambda: np_kmeans1d(A, 16, 30), None, A.size * (f + 1), 1),
        ("gptq_int4", lambda: K.gptq_quantize(W, U, sg, zg, bits=4, signed=True, block=128), None,
         lambda: np_gptq(W, U, sg, zg, -8, 7, 128), None, n2 * (f + f + 1 + f), 1),
    ]
    if only:
        cases = [c for c in cases if c[0] in only]
    results = []
    src = np.ones(n2, np.float32)
    dst = np.ones_like(src)  # pre-faulted

    def fresh_copy():
        out = np.empty_like(src)
        K._memcpy(out, src)
        return out

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def memcpy_gbps(t: int, fresh: bool) -> float:
        K.set_threads(t)
        fn = fresh_copy if fresh else (lambda: K._memcpy(dst, src))
        return 2 * src.nbytes / best_time(fn, 3) / 1e9

    print(f"isa={K.isa()} threads={all_threads}; memcpy GB/s (read+write) into a pre-faulted "
          "buffer: " + ", ".join(f"{t} thr {memcpy_gbps(t, False):.1f}" for t in thread_counts)
          + "; into a fresh array: "
          + ", ".join(f"{t} thr {memcpy_gbps(t, True):.1f}" for t in thread_counts), file=log)
    print(f"{'kernel':22s} {'thr':>3s} | {'ms':>8s} {'GB/s':>6s} {'memcpy':>6s} {'vs':>6s} | "
          f"{'fresh ms':>8s} {'GB/s':>6s} {'memcpy':>6s} {'vs':>6s} | {'numpy ms':>9s} "
          f"{'x':>6s} | {'np out ms':>9s} {'x':>6s}", file=log)
    inf = float("inf")
    for name, ours, ours_out, ref, ref_out, nbytes, rep in cases:
        np_time: dict[int, float] = {}
        npo_time: dict[int, float] = {}
        for t in thread_counts:
            need_np = t == thread_counts[0] or name == "gptq_int4"
            b_fresh = b_out = b_np = b_npo = b_mc = b_mcf = inf
            K.set_threads(t)
            ours()  # warm up (thread start, caches, the out= buffers' first touch)
            if ours_out:
                ours_out()
            for _ in range(rep):
                K.set_threads(t)
                b_fresh = min(b_fresh, timed(ours))
                if ours_out:
                    b_out = min(b_out, timed(ours_out))
                if need_np:
                    with blas_threads(t):
                        b_np = min(b_np, timed(ref))
                        if ref_out:
                            b_npo = min(b_npo, timed(ref_out))
                K.set_threads(t)
                b_mcf = min(b_mcf, timed(fresh_copy))
                b_mc = min(b_mc, timed(lambda: K._memcpy(dst, src)))
            np_time[t] = b_np if need_np else np_time[thread_counts[0]]
            npo_time[t] = b_npo if need_np else npo_time[thread_counts[0]]
            sec = b_out if ours_out else b_fresh
            gbps, gbps_f = nbytes / sec / 1e9, nbytes / b_fresh / 1e9
            mc, mcf = 2 * src.nbytes / b_mc / 1e9, 2 * src.nbytes / b_mcf / 1e9
            row = {
                "kernel": name,
                "threads": t,
                "seconds": round(sec, 6),
                "gbps": round(gbps, 3),
                "vs_numpy": round(np_time[t] / b_fresh, 2),
                "vs_memcpy": round(gbps / mc, 3),
                "seconds_fresh": round(b_fresh, 6),
                "gbps_fresh": round(gbps_f, 3),
                "vs_memcpy_fresh": round(gbps_f / mcf, 3),
                "vs_numpy_out": round(npo_time[t] / b_out, 2) if ours_out and ref_out else None,
            }
            results.append(row)
            npo = (f"{npo_time[t] * 1e3:9.2f} {row['vs_numpy_out']:6.2f}" if row["vs_numpy_out"]
                   else f"{'-':>9s} {'-':>6s}")
            print(f"{name:22s} {t:3d} | {sec * 1e3:8.2f} {gbps:6.2f} {mc:6.1f} "
                  f"{row['vs_memcpy'] * 100:5.0f}% | {b_fresh * 1e3:8.2f} {gbps_f:6.2f} {mcf:6.1f} "
                  f"{row['vs_memcpy_fresh'] * 100:5.0f}% | {np_time[t] * 1e3:9.2f} "
                  f"{row['vs_numpy']:6.2f} | {npo}", file=log, flush=True)
        K.set_threads(all_threads)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list of result objects")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    a = ap.parse_args(argv)
    only = {s for s in a.only.split(",") if s} or None
    res = run(quick=a.quick, only=only, log=sys.stderr if a.json else sys.stdout)
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
