"""Wrapper of kmeans.c: 1-D k-means (Lloyd) for weight clustering."""

from __future__ import annotations

import numpy as np

from kernels._args import _check, _data, _fail, _int, _ptr, _wptr
from kernels._load import lib


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
