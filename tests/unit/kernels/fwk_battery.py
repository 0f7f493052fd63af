"""Every kernel on fixed inputs (odd sizes, tails, NaN/Inf, every layout, sizes that thread).

`python fwk_battery.py OUT.npz` saves the outputs, so a subprocess started with FW_KERNELS_ISA or
FW_KERNELS_THREADS set can be compared with the parent process bit for bit."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import fwk_oracles as O  # noqa: E402
import kernels as K  # noqa: E402


def inputs():
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal((203, 1237)) * 2).astype(np.float32)
    flat = x.reshape(-1)
    flat[::977] = np.nan
    flat[5::1999] = np.inf
    flat[7::2003] = -np.inf
    flat[11::1009] = 0.0
    flat[13::1013] = -0.0
    small = (rng.standard_normal((3, 37, 5)) * 3).astype(np.float32)
    fin = np.where(np.isfinite(x), x, 0).astype(np.float32)
    return x, small, fin


def run() -> dict[str, np.ndarray]:
    x, small, fin = inputs()
    out: dict[str, np.ndarray] = {}
    for name, arr in (("x", x), ("small", small)):
        for bits, signed in ((8, True), (8, False), (4, True), (2, False)):
            cases = [(None, None)] + [(ax, None) for ax in range(arr.ndim)] + \
                    [(ax, bs) for ax in range(arr.ndim) for bs in (1, 16, 32, 33)]
            for axis, bs in cases:
                tag = f"{name}_{bits}{'s' if signed else 'u'}_{axis}_{bs}"
                for method in ("absmax", "minmax"):
                    s, z = K.choose_qparams(arr, bits=bits, symmetric=method == "absmax",
                                            signed=signed, axis=axis, block_size=bs, method=method)
                    q = K.quantize(arr, s, z, bits=bits, signed=signed, axis=axis, block_size=bs)
                    out[f"q_{tag}_{method}"] = q
                    out[f"d_{tag}_{method}"] = K.dequantize(q, s, z, axis=axis, block_size=bs)
                    out[f"s_{tag}_{method}"] = s
    for arr, tag in ((x, "x"), (small, "small")):
        t = K.kth_smallest_abs(arr, arr.size // 3)
        out[f"kth_{tag}"] = np.float32(t)
        m = K.magnitude_mask(arr, t)
        out[f"mask_{tag}"] = m
        out[f"apply_{tag}"] = K.apply_mask(arr, m)
        out[f"hist_{tag}"] = K.histogram(arr, 2048, -5.0, 5.0)
        for ax in range(arr.ndim):
            for p in (1, 2):
                out[f"norm_{tag}_{ax}_{p}"] = K.channel_norms(arr, axis=ax, p=p)
            out[f"alpha_{tag}_{ax}"] = K.sign_quantize(arr, axis=ax)[1]
    out["nm"] = K.nm_mask(x[:, :1236], 2, 4, axis=1)
    out["nm0"] = K.nm_mask(x[:200], 4, 8, axis=0)
    c, l = K.kmeans1d(x, 16, seed=3)
    out["km_c"], out["km_l"] = c, l
    out["mse"] = K.choose_qparams(fin, bits=4, symmetric=True, axis=0, method="mse")[0]
    out["mse_t"] = K.choose_qparams(fin, bits=4, symmetric=False, signed=False, method="mse")[0]
    rng = np.random.default_rng(7)
    for rows, cols in ((130, 300), (9, 47)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        u = O.hinv_chol(rng.standard_normal((2 * cols, cols)))
        s, z = K.choose_qparams(w, bits=4, symmetric=True, axis=0)
        q, wh = K.gptq_quantize(w, u, s, z, bits=4, signed=True, block=64)
        out[f"gptq_q_{rows}"], out[f"gptq_w_{rows}"] = q, wh
        # a block wider than the packed-U buffer of 128 rows, more than one 192-column U block
        q, wh = K.gptq_quantize(w, u, s, z, bits=4, signed=True, block=140)
        out[f"gptq140_q_{rows}"], out[f"gptq140_w_{rows}"] = q, wh
        sg, zg = K.choose_qparams(w, bits=4, symmetric=False, signed=False, axis=1, block_size=16)
        q, wh = K.gptq_quantize(w, u, sg, zg, bits=4, signed=False, group_size=16, block=32)
        out[f"gptqg_q_{rows}"], out[f"gptqg_w_{rows}"] = q, wh
        wh, m = K.sparsegpt_prune(w, u, sparsity=0.5, block=64)
        out[f"sgpt_w_{rows}"], out[f"sgpt_m_{rows}"] = wh, m
        if cols % 4 == 0:
            wh, m = K.sparsegpt_prune(w, u, sparsity=0, n=2, m=4, block=64)
            out[f"sgpt24_w_{rows}"], out[f"sgpt24_m_{rows}"] = wh, m
    return out


if __name__ == "__main__":
    res = run()
    res["__isa__"] = np.array(K.isa())
    res["__threads__"] = np.array(K.threads())
    np.savez(sys.argv[1], **res)
