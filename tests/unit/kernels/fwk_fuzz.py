"""Throws odd arguments at every kernel; any exception other than KernelError / TypeError (a
Python-level call mistake) is reported, and a crash kills this process (the test runs it in a
subprocess and checks the exit status)."""

from __future__ import annotations

import itertools
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import kernels as K  # noqa: E402

rng = np.random.default_rng(0)
ARRAYS = [
    np.zeros(0, np.float32), np.float32(1.5), np.array(2.0, np.float32),
    rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)[:, ::2],
    np.full((2, 4), np.nan, np.float32), np.full(7, np.inf, np.float32),
    rng.standard_normal((2, 3, 4)).astype(np.float64), np.arange(6, dtype=np.int8).reshape(2, 3),
    np.arange(6, dtype=np.uint8), np.ones((3, 3), bool), np.array(["a"]), np.empty((0, 4), np.float32),
    rng.standard_normal((2, 4, 4)).astype(np.float32).transpose(2, 0, 1),
]
SCALARS = [None, 0, 1, 2, 3, 4, 8, 16, -1, -(2**63), 2**64, 2**31, 1.5, float("nan"), float("inf"),
           "x", True, np.int64(2), np.float32(0.5), [1, 2], (3,), b"\x00"]


def values():
    return ARRAYS + SCALARS


CALLS = [
    ("quantize", lambda a, b, c: K.quantize(a, b, c, bits=8, signed=True)),
    ("quantize_axis", lambda a, b, c: K.quantize(a, np.ones(5, np.float32), np.zeros(5, np.int32), bits=b, signed=True, axis=c)),
    ("quantize_block", lambda a, b, c: K.quantize(a, np.ones((3, 3), np.float32), None, bits=4, signed=False, axis=b, block_size=c)),
    ("dequantize", lambda a, b, c: K.dequantize(a, b, c)),
    ("dequantize_block", lambda a, b, c: K.dequantize(a, np.ones((2, 1), np.float32), 0, axis=b, block_size=c)),
    ("pack", lambda a, b, c: K.pack(a, b)),
    ("unpack", lambda a, b, c: K.unpack(a, b, signed=True, count=c)),
    ("choose_qparams", lambda a, b, c: K.choose_qparams(a, bits=b, symmetric=True, axis=c)),
    ("choose_qparams_mse", lambda a, b, c: K.choose_qparams(a, bits=4, symmetric=False, block_size=b, axis=c, method="mse")),
    ("sign_quantize", lambda a, b, c: K.sign_quantize(a, axis=b)),
    ("pack_signs", lambda a, b, c: K.pack_signs(a)),
    ("unpack_signs", lambda a, b, c: K.unpack_signs(a, b)),
    ("kth", lambda a, b, c: K.kth_smallest_abs(a, b)),
    ("kth_list", lambda a, b, c: K.kth_smallest_abs([a, b], c)),
    ("magnitude_mask", lambda a, b, c: K.magnitude_mask(a, b)),
    ("apply_mask", lambda a, b, c: K.apply_mask(a, b)),
    ("nm_mask", lambda a, b, c: K.nm_mask(a, b, c, axis=-1)),
    ("channel_norms", lambda a, b, c: K.channel_norms(a, axis=b, p=c)),
    ("kmeans1d", lambda a, b, c: K.kmeans1d(a, b, iters=3, seed=c)),
    ("histogram", lambda a, b, c: K.histogram(a, b, -1.0, c)),
    ("percentile", lambda a, b, c: K.percentile_from_histogram(a, 0.0, b, c)),
    ("entropy", lambda a, b, c: K.entropy_threshold(a, 0.0, b, c)),
    ("Histogram", lambda a, b, c: K.Histogram(b).update(a).percentile(c)),
    ("gptq", lambda a, b, c: K.gptq_quantize(a, np.eye(a.shape[-1] if hasattr(a, "shape") and a.ndim else 1, dtype=np.float32), b, c, bits=4, signed=True)),
    ("gptq_group", lambda a, b, c: K.gptq_quantize(np.ones((2, 4), np.float32), a, np.ones((2, 2), np.float32), None, bits=4, signed=True, group_size=b, block=c)),
    ("sparsegpt", lambda a, b, c: K.sparsegpt_prune(a, np.eye(5, dtype=np.float32), sparsity=b, n=c, m=4)),
    ("sparsegpt_u", lambda a, b, c: K.sparsegpt_prune(np.ones((3, 4), np.float32), a, sparsity=0.5, block=b)),
    ("set_threads", lambda a, b, c: K.set_threads(b)),
]


def main() -> int:
    random.seed(0)
    vals = values()
    bad = 0
    n = 0
    for name, fn in CALLS:
        combos = list(itertools.product(vals, repeat=3))
        random.shuffle(combos)
        for a, b, c in combos[:1500]:
            n += 1
            try:
                fn(a, b, c)
            except (K.KernelError, TypeError):
                pass
            except Exception as exc:  # noqa: BLE001
                bad += 1
                if bad <= 20:
                    print(f"{name}: {type(exc).__name__}: {exc} <- {type(a).__name__} {b!r} {c!r}")
    K.set_threads(None)
    print(f"{n} calls, {bad} unexpected exceptions")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
