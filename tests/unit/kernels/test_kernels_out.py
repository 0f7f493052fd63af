"""`out=` on the streaming kernels (quantize, dequantize, magnitude_mask, apply_mask): the result
written into the caller's buffer is bit-identical to the returned-array form, the buffer itself is
returned, and bad buffers (dtype, shape, layout, read-only, overlapping an input) raise."""

from __future__ import annotations

import numpy as np
import pytest

import fwk_oracles as O
import kernels as K


def _w(shape=(64, 300), seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w.flat[::97] = np.nan
    w.flat[5::131] = np.inf
    w.flat[7::113] = -0.0
    return w


def _same(a, b):
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _calls(w):
    """(name, call(out=None), expected dtype) for every out= kernel on w."""
    s, z = K.choose_qparams(w, bits=8, symmetric=False, signed=False, axis=0)
    sb, zb = K.choose_qparams(w, bits=4, symmetric=True, axis=1, block_size=32)
    q = K.quantize(w, s, z, bits=8, signed=False, axis=0)
    mask = K.magnitude_mask(w, 0.5)
    return [
        ("quantize_axis", lambda out=None: K.quantize(w, s, z, bits=8, signed=False, axis=0, out=out),
         np.uint8),
        ("quantize_block", lambda out=None: K.quantize(w, sb, zb, bits=4, signed=True, axis=1,
                                                       block_size=32, out=out), np.int8),
        ("dequantize", lambda out=None: K.dequantize(q, s, z, axis=0, out=out), np.float32),
        ("magnitude_mask", lambda out=None: K.magnitude_mask(w, 0.5, out=out), np.uint8),
        ("apply_mask", lambda out=None: K.apply_mask(w, mask, out=out), np.float32),
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_out_matches_returned_array(threads):
    old = K.set_threads(threads)
    try:
        # large enough to be split over threads and walked as interleaved streams
        w = _w((512, 1024))
        for name, call, dtype in _calls(w):
            ref = call()
            buf = np.full(w.shape, 0x5A, dtype=np.uint8).view(dtype) if dtype != np.float32 \
                else np.full(w.shape, np.float32(7.25))
            got = call(out=buf)
            assert got is buf, name
            _same(got, ref)
    finally:
        K.set_threads(old)


def test_out_results_follow_the_oracles():
    w = _w()
    mask = K.magnitude_mask(w, 0.5, out=np.empty(w.shape, np.uint8))
    np.testing.assert_array_equal(mask, (np.abs(w) > 0.5).astype(np.uint8))
    out = K.apply_mask(w, mask, out=np.empty_like(w))
    _same(out, np.where(mask.astype(bool), w, np.float32(0)))
    s, z = K.choose_qparams(w, bits=8, symmetric=True, axis=0)
    q = K.quantize(w, s, z, bits=8, signed=True, axis=0, out=np.empty(w.shape, np.int8))
    np.testing.assert_array_equal(q, O.quantize(w, s, z, 8, True, 0, None))


def test_apply_mask_in_place():
    w = _w((256, 1024))
    mask = K.magnitude_mask(w, 0.5)
    ref = K.apply_mask(w, mask)
    got = K.apply_mask(w, mask, out=w)
    assert got is w
    _same(w, ref)


def test_out_empty_arrays():
    w = np.zeros((0, 3), np.float32)
    out = np.empty((0, 3), np.uint8)
    assert K.magnitude_mask(w, 0.0, out=out) is out
    assert K.apply_mask(w, out, out=np.empty((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("case", ["dtype", "shape", "strided", "readonly", "not_array", "fortran"])
def test_bad_out_raises(case):
    w = _w((16, 32))
    for name, call, dtype in _calls(w):
        if case == "dtype":
            bad = np.empty(w.shape, np.float64 if dtype != np.float64 else np.float32)
        elif case == "shape":
            bad = np.empty((16, 33), dtype)
        elif case == "strided":
            bad = np.empty((16, 64), dtype)[:, ::2]
        elif case == "readonly":
            bad = np.empty(w.shape, dtype)
            bad.flags.writeable = False
        elif case == "fortran":
            bad = np.empty(w.shape, dtype, order="F")
        else:
            bad = [[0] * 32] * 16
        with pytest.raises(K.KernelError):
            call(out=bad)


def test_out_overlapping_an_input_raises():
    w = _w((16, 32))
    s, z = K.choose_qparams(w, bits=8, symmetric=True, axis=0)
    q = K.quantize(w, s, z, bits=8, signed=True, axis=0)
    mask = K.magnitude_mask(w, 0.5)
    with pytest.raises(K.KernelError, match="overlaps"):
        K.magnitude_mask(w, 0.5, out=w.view(np.uint8).ravel()[: w.size].reshape(w.shape))
    with pytest.raises(K.KernelError, match="overlaps"):
        K.quantize(w, s, z, bits=8, signed=True, axis=0,
                   out=w.view(np.int8).ravel()[64 : 64 + w.size].reshape(w.shape))
    big = np.zeros(q.size * 4 + 4, np.uint8)
    qv = big[: q.size].view(np.int8).reshape(q.shape)
    qv[...] = q
    with pytest.raises(K.KernelError, match="overlaps"):
        K.dequantize(qv, s, z, axis=0, out=big[4:].view(np.float32).reshape(q.shape))
    raw = np.zeros(mask.size * 4, np.uint8)  # a mask whose bytes lie inside out's
    raw[: mask.size] = mask.ravel()
    with pytest.raises(K.KernelError, match="overlaps"):  # out may be w itself, not the mask
        K.apply_mask(w, raw[: mask.size].reshape(mask.shape),
                     out=raw.view(np.float32).reshape(w.shape))
    shifted = np.zeros(w.size + 1, np.float32)
    shifted[1:] = w.ravel()
    wv = shifted[1:].reshape(w.shape)
    with pytest.raises(K.KernelError, match="overlaps"):  # a shifted view of w is not w
        K.apply_mask(wv, mask, out=shifted[:-1].reshape(w.shape))

