"""Wrappers of gptq.c: GPTQ's column-by-column quantization and SparseGPT's pruning, both with the
upper Cholesky factor of the inverse Hessian."""

from __future__ import annotations

import numpy as np

from kernels._args import _check, _data, _fail, _float, _int, _ptr, _qrange, _scale_arr, _wptr, _zp_arr
from kernels._load import lib


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
