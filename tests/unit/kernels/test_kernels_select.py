"""Selection, masks, N:M, norms and sign quantization against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fwk_oracles as O
import kernels as K

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
f32 = st.floats(width=32)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7)
arrays = lambda shp=shapes, el=f32: hnp.arrays(np.float32, shp, elements=el)  # noqa: E731


def same_bits(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ kth smallest |w|


@SETTINGS
@given(st.lists(arrays(hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=9)),
                min_size=1, max_size=4), st.data())
def test_kth_smallest_abs_matches_sort(arrs, data):
    total = sum(a.size for a in arrs)
    if total == 0:
        with pytest.raises(K.KernelError):
            K.kth_smallest_abs(arrs, 1)
        return
    k = data.draw(st.integers(1, total))
    got = K.kth_smallest_abs(arrs, k)
    ref = O.abs_sort_key(np.concatenate([a.reshape(-1) for a in arrs]))[k - 1]
    if np.isnan(ref):
        assert np.isnan(got)
    else:
        assert got == float(ref)


def test_kth_smallest_abs_large_and_threaded():
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal(n).astype(np.float32) for n in (1_000_003, 17, 300_000)]
    allv = np.sort(np.abs(np.concatenate(arrs)))
    for k in (1, 5, 650_000, allv.size):
        assert K.kth_smallest_abs(arrs, k) == float(allv[k - 1])
    # heavy ties
    z = np.zeros(500_000, np.float32)
    z[::7] = 3.0
    assert K.kth_smallest_abs(z, 400_000) == 0.0
    assert K.kth_smallest_abs(z, 500_000) == 3.0


@pytest.mark.parametrize("seed", [0, 1])
def test_kth_smallest_abs_bracket_path_ties_nan_inf(seed):
    # >= 2^20 elements takes the sample-bracket path; heavy ties, NaN and Inf must stay exact
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1_500_007).astype(np.float32)
    x[rng.random(x.size) < 0.3] = 0.0
    x[rng.random(x.size) < 0.01] = np.nan
    x[rng.random(x.size) < 0.01] = -np.inf
    x[::5] = np.float32(0.5)
    ref = np.sort(np.abs(x))
    for k in (1, 400_000, 450_000, 700_000, 1_000_000, 1_480_000, x.size):
        got = K.kth_smallest_abs([x[:1000], x[1000:]], k)
        if np.isnan(ref[k - 1]):
            assert np.isnan(got)
        else:
            assert got == float(ref[k - 1]), k


def test_kth_bad_k():
    x = np.ones(4, np.float32)
    for k in (0, 5, -1, 1.5, True):
        with pytest.raises(K.KernelError):
            K.kth_smallest_abs(x, k)
    with pytest.raises(K.KernelError):
        K.kth_smallest_abs([x, x.astype(np.float64)], 1)


# ------------------------------------------------------------------ masks


@SETTINGS
@given(arrays(), st.one_of(st.floats(0, 10), st.just(0.0), st.just(float("nan")),
                          st.just(float("inf")), st.floats(-1, 0)))
def test_magnitude_mask(w, t):
    m = K.magnitude_mask(w, t)
    assert m.dtype == np.uint8 and m.shape == w.shape
    with np.errstate(invalid="ignore"):
        ref = (np.abs(w).astype(np.float64) > t).astype(np.uint8)
    np.testing.assert_array_equal(m, ref)


def test_magnitude_mask_double_threshold_rounding():
    w = np.array([0.1, np.nextafter(np.float32(0.1), np.float32(1))], np.float32)
    # float32(0.1) > 0.1 (double): |w| = float32(0.1) must still count as > 0.1
    assert K.magnitude_mask(w, 0.1).tolist() == [1, 1]
    assert K.magnitude_mask(w, float(np.float32(0.1))).tolist() == [0, 1]


@SETTINGS
@given(arrays(), st.data())
def test_apply_mask(w, data):
    m = data.draw(hnp.arrays(np.uint8, w.shape, elements=st.integers(0, 3)))
    out = K.apply_mask(w, m)
    same_bits(out, np.where(m != 0, w, np.float32(0)))
    out = K.apply_mask(w, m.astype(bool))
    same_bits(out, np.where(m != 0, w, np.float32(0)))


def test_mask_large_threaded():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1000, 999)).astype(np.float32)
    t = K.kth_smallest_abs(w, w.size // 2)
    m = K.magnitude_mask(w, t)
    assert m.sum() == w.size - w.size // 2
    same_bits(K.apply_mask(w, m), np.where(m != 0, w, np.float32(0)))


# ------------------------------------------------------------------ N:M


@st.composite
def nm_case(draw):
    nd = draw(st.integers(1, 3))
    axis = draw(st.integers(-nd, nd - 1))
    m = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(1, m))
    shape = list(draw(hnp.array_shapes(min_dims=nd, max_dims=nd, min_side=0, max_side=5)))
    shape[axis % nd] = m * draw(st.integers(0, 3))
    el = st.one_of(st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf]), f32)
    w = draw(hnp.arrays(np.float32, tuple(shape), elements=el))
    return w, n, m, axis


@SETTINGS
@given(nm_case())
def test_nm_mask_matches_oracle(case):
    w, n, m, axis = case
    got = K.nm_mask(w, n, m, axis=axis)
    np.testing.assert_array_equal(got, O.nm_mask(w, n, m, axis % w.ndim))


def test_nm_mask_2_4():
    w = np.array([[0.1, -3, 2, 0.5, 1, 1, 1, 1]], np.float32)
    assert K.nm_mask(w, 2, 4, axis=1).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    with pytest.raises(K.KernelError):
        K.nm_mask(w, 2, 3, axis=1)
    with pytest.raises(K.KernelError):
        K.nm_mask(w, 5, 4, axis=1)
    with pytest.raises(K.KernelError):
        K.nm_mask(w, 0, 4, axis=1)


# ------------------------------------------------------------------ norms and signs


@SETTINGS
@given(arrays(el=st.floats(-1e6, 1e6, width=32)), st.data())
def test_channel_norms(w, data):
    axis = data.draw(st.integers(-w.ndim, w.ndim - 1))
    p = data.draw(st.sampled_from([1, 2]))
    got = K.channel_norms(w, axis=axis, p=p)
    ref = O.channel_norms(w, axis % w.ndim, p)
    assert got.dtype == np.float32 and got.shape == (w.shape[axis],)
    np.testing.assert_allclose(got, ref.astype(np.float32), rtol=2e-7, atol=0)


def test_channel_norms_nonfinite_propagates():
    w = np.array([[1.0, np.inf], [np.nan, 2.0]], np.float32)
    got = K.channel_norms(w, axis=0, p=2)
    assert got[0] == np.inf and np.isnan(got[1])


@SETTINGS
@given(arrays(), st.data())
def test_sign_quantize(w, data):
    axis = data.draw(st.integers(-w.ndim, w.ndim - 1))
    signs, alpha = K.sign_quantize(w, axis=axis)
    np.testing.assert_array_equal(signs, np.where(w < 0, -1, 1).astype(np.int8))
    ax = axis % w.ndim
    cnt = w.size // w.shape[ax] if w.shape[ax] else 0
    if cnt == 0:
        np.testing.assert_array_equal(alpha, np.zeros(w.shape[ax], np.float32))
    else:
        with np.errstate(all="ignore"):
            ref = (O.channel_norms(w, ax, 1) / cnt).astype(np.float32)
        np.testing.assert_allclose(alpha, ref, rtol=2e-7, atol=0, equal_nan=True)
    p = K.pack_signs(signs)
    np.testing.assert_array_equal(K.unpack_signs(p, signs.size), signs.reshape(-1))
    np.testing.assert_array_equal(p, np.packbits((signs.reshape(-1) > 0).astype(np.uint8),
                                                 bitorder="little"))


def test_pack_signs_rejects_zero():
    with pytest.raises(K.KernelError):
        K.pack_signs(np.array([1, 0, -1], np.int8))
