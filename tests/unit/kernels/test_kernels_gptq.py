"""GPTQ and SparseGPT sweeps against float64 numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest

import fwk_oracles as O
import kernels as K

W_RTOL = 1e-4  # float32 sweep vs float64 oracle: accumulated rounding over `cols` updates


def problem(rows, cols, seed=0, nsamples=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((nsamples or 2 * cols, cols)) * rng.uniform(0.2, 3, cols)
    u = O.hinv_chol(x)
    return w, u


@pytest.mark.parametrize("rows,cols,group,block", [(16, 64, None, 16), (33, 70, 16, 32),
                                                   (5, 9, None, 128), (40, 128, 32, 128)])
@pytest.mark.parametrize("bits,signed", [(4, True), (8, False), (2, True)])
def test_gptq_matches_oracle(rows, cols, group, block, bits, signed):
    w, u = problem(rows, cols)
    qmin, qmax = O.qrange(bits, signed)
    if group is None:
        s, z = K.choose_qparams(w, bits=bits, symmetric=signed, signed=signed, axis=0)
    else:
        s, z = K.choose_qparams(w, bits=bits, symmetric=signed, signed=signed, axis=1,
                                block_size=group)
    q, w_hat = K.gptq_quantize(w, u, s, z, bits=bits, signed=signed, group_size=group, block=block)
    assert q.dtype == (np.int8 if signed else np.uint8) and q.shape == w.shape
    assert w_hat.dtype == np.float32
    Q, What = O.gptq(w, u, s, z, qmin, qmax, group)
    # a rounding tie may flip a few codes; everything else must agree
    mism = (q.astype(np.int64) != Q)
    assert mism.mean() <= 0.01, mism.mean()
    ok = ~mism.any(axis=1)
    np.testing.assert_allclose(w_hat[ok], What[ok], rtol=W_RTOL, atol=1e-6)
    # w_hat is exactly the dequantized q
    sc = s[:, None] if group is None else np.repeat(s, group, axis=1)[:, :w.shape[1]]
    zp = z[:, None] if group is None else np.repeat(z, group, axis=1)[:, :w.shape[1]]
    np.testing.assert_array_equal(w_hat, ((q.astype(np.int32) - zp).astype(np.float32) * sc))


def test_gptq_beats_round_to_nearest():
    rng = np.random.default_rng(1)
    rows, cols = 64, 96
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((512, cols)) @ rng.standard_normal((cols, cols)) * 0.3
    u = O.hinv_chol(x)
    s, z = K.choose_qparams(w, bits=4, symmetric=True, axis=0)
    _, w_hat = K.gptq_quantize(w, u, s, z, bits=4, signed=True)
    rtn = K.dequantize(K.quantize(w, s, z, bits=4, signed=True, axis=0), s, z, axis=0)
    err = lambda a: float(((x @ (a - w).T.astype(np.float64)) ** 2).sum())  # noqa: E731
    assert err(w_hat) < err(rtn)


def test_gptq_block_size_and_threads_do_not_change_bits():
    w, u = problem(300, 200, seed=3)
    s, z = K.choose_qparams(w, bits=4, symmetric=True, axis=0)
    ref = K.gptq_quantize(w, u, s, z, bits=4, signed=True, block=200)
    for block in (1, 7, 64, 128, 1000):
        q, wh = K.gptq_quantize(w, u, s, z, bits=4, signed=True, block=block)
        np.testing.assert_array_equal(q, ref[0])
        np.testing.assert_array_equal(wh.view(np.uint32), ref[1].view(np.uint32))
    old = K.set_threads(1)
    try:
        q, wh = K.gptq_quantize(w, u, s, z, bits=4, signed=True, block=64)
    finally:
        K.set_threads(old)
    np.testing.assert_array_equal(wh.view(np.uint32), ref[1].view(np.uint32))


def test_gptq_bad_args():
    w, u = problem(4, 8)
    s, z = K.choose_qparams(w, bits=4, symmetric=True, axis=0)
    kw = dict(bits=4, signed=True)
    bad_u = u.copy()
    bad_u[2, 2] = 0
    nan_w = w.copy()
    nan_w[1, 1] = np.nan
    for call in (
        lambda: K.gptq_quantize(w, bad_u, s, z, **kw),
        lambda: K.gptq_quantize(nan_w, u, s, z, **kw),
        lambda: K.gptq_quantize(w, u[:4, :4], s, z, **kw),
        lambda: K.gptq_quantize(w, u, s[:2], z[:2], **kw),
        lambda: K.gptq_quantize(w, u, s, z, group_size=3, **kw),
        lambda: K.gptq_quantize(w, u, -s, z, **kw),
        lambda: K.gptq_quantize(w, u, s, z + 100, **kw),
        lambda: K.gptq_quantize(w, u, s, z, block=0, **kw),
        lambda: K.gptq_quantize(w[0], u, s, z, **kw),
        lambda: K.gptq_quantize(w.astype(np.float64), u, s, z, **kw),
    ):
        with pytest.raises(K.KernelError):
            call()


@pytest.mark.parametrize("rows,cols,block,sparsity", [(16, 64, 16, 0.5), (33, 70, 32, 0.3),
                                                      (8, 24, 128, 0.75), (10, 40, 8, 0.0)])
def test_sparsegpt_unstructured_matches_oracle(rows, cols, block, sparsity):
    w, u = problem(rows, cols, seed=4)
    w_hat, mask = K.sparsegpt_prune(w, u, sparsity=sparsity, block=block)
    W, M = O.sparsegpt(w, u, sparsity, block=block)
    assert mask.dtype == np.uint8 and w_hat.dtype == np.float32
    assert (mask != M).mean() <= 0.01
    np.testing.assert_array_equal(w_hat[mask == 0], 0)
    for c0 in range(0, cols, block):
        kb = min(block, cols - c0)
        assert (mask[:, c0:c0 + kb] == 0).sum() == int(np.floor(sparsity * rows * kb))
    ok = (mask == M).all(axis=1)
    np.testing.assert_allclose(w_hat[ok], W[ok], rtol=W_RTOL, atol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_matches_oracle(n, m):
    w, u = problem(24, 64, seed=5)
    w_hat, mask = K.sparsegpt_prune(w, u, sparsity=0.0, n=n, m=m, block=32)
    W, M = O.sparsegpt(w, u, 0.0, n=n, m=m, block=32)
    assert (mask.reshape(24, -1, m).sum(axis=2) == n).all()
    assert (mask != M).mean() <= 0.01
    ok = (mask == M).all(axis=1)
    np.testing.assert_allclose(w_hat[ok], W[ok], rtol=W_RTOL, atol=1e-5)


def test_sparsegpt_bad_args():
    w, u = problem(4, 8)
    for kw in (dict(sparsity=1.5), dict(sparsity=0.5, n=2, m=0), dict(sparsity=0, n=3, m=2),
               dict(sparsity=0, n=2, m=3), dict(sparsity=0, n=2, m=4, block=6),
               dict(sparsity=float("nan"))):
        with pytest.raises(K.KernelError):
            K.sparsegpt_prune(w, u, **kw)
