"""k-means, histograms, percentile and entropy threshold against numpy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fwk_oracles as O
import kernels as K

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
f32 = st.floats(width=32)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9)

CENTROID_RTOL = 1e-5  # centroids are means from double prefix sums, rounded to float32


def check_kmeans(x, k, cent, labels, converged=True):
    assert cent.dtype == np.float32 and cent.shape == (k,)
    assert labels.dtype == np.uint8 and labels.shape == x.shape
    assert np.all(np.diff(cent) >= 0)
    fin = np.isfinite(x)
    # every finite value is labelled with a nearest centroid (ties: lower index)
    d = np.abs(x[fin].astype(np.float64)[:, None] - cent.astype(np.float64)[None, :])
    if d.size:
        np.testing.assert_array_equal(labels[fin], np.argmin(d, axis=1))
    assert np.all(labels[np.isnan(x)] == 0)
    assert np.all(labels[x == -np.inf] == 0)
    assert np.all(labels[x == np.inf] == k - 1)
    if converged and fin.any():
        for j in range(k):
            sel = x[fin][labels[fin] == j]
            if sel.size:
                np.testing.assert_allclose(cent[j], sel.astype(np.float64).mean(),
                                           rtol=CENTROID_RTOL, atol=1e-30)


@SETTINGS
@given(hnp.arrays(np.float32, shapes, elements=st.one_of(
    st.floats(-100, 100, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))),
    st.integers(1, 8), st.sampled_from(["kmeans++", "quantile"]), st.integers(0, 5))
def test_kmeans_properties(x, k, init, seed):
    cent, labels = K.kmeans1d(x, k, init=init, iters=300, seed=seed)
    check_kmeans(x, k, cent, labels)


def test_kmeans_quality_vs_sklearn():
    sk = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.05, 3000) for c in (-2, -0.5, 0.3, 1.7)]).astype(np.float32)
    cent, labels = K.kmeans1d(x, 4, iters=100)
    check_kmeans(x, 4, cent, labels)
    np.testing.assert_allclose(cent, [-2, -0.5, 0.3, 1.7], atol=0.01)
    w = rng.standard_normal(20000).astype(np.float32)
    for init in ("kmeans++", "quantile"):
        cent, labels = K.kmeans1d(w, 16, init=init, iters=200, seed=1)
        inertia = float(((w - cent[labels]).astype(np.float64) ** 2).sum())
        ref = sk.KMeans(16, n_init=3, random_state=0).fit(w.reshape(-1, 1).astype(np.float64))
        assert inertia <= ref.inertia_ * 1.02


def test_kmeans_deterministic_and_thread_independent():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 700)).astype(np.float32)
    a = K.kmeans1d(x, 32, seed=7)
    old = K.set_threads(1)
    try:
        b = K.kmeans1d(x, 32, seed=7)
    finally:
        K.set_threads(old)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_kmeans_edge_cases():
    c, l = K.kmeans1d(np.zeros(0, np.float32), 4)
    assert c.tolist() == [0, 0, 0, 0] and l.shape == (0,)
    c, l = K.kmeans1d(np.array([np.nan, np.inf], np.float32), 3)
    assert l.tolist() == [0, 2]
    c, l = K.kmeans1d(np.array([5.0, 5.0, 5.0], np.float32), 3, init="quantile")
    assert c.tolist() == [5, 5, 5] and l.tolist() == [0, 0, 0]
    for bad in (dict(k=0), dict(k=257), dict(k=2, init="x"), dict(k=2, iters=-1), dict(k=2, seed=-1)):
        with pytest.raises(K.KernelError):
            K.kmeans1d(np.ones(3, np.float32), **bad)


# ------------------------------------------------------------------ histograms


@SETTINGS
@given(hnp.arrays(np.float32, shapes, elements=f32), st.integers(1, 50),
       st.floats(-100, 100), st.floats(0.001, 100))
def test_histogram_matches_oracle(x, bins, lo, width):
    hi = lo + width
    got = K.histogram(x, bins, lo, hi)
    np.testing.assert_array_equal(got, O.histogram(x, bins, np.float32(lo), np.float32(hi)))
    assert got.sum() == np.count_nonzero(~np.isnan(x))


def test_histogram_large_threaded():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3_000_001).astype(np.float32)
    got = K.histogram(x, 2048, -4.0, 4.0)
    np.testing.assert_array_equal(got, O.histogram(x, 2048, -4.0, 4.0))


@pytest.mark.parametrize("kind", ["spread", "piled", "piled_late", "nan_runs"])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_large_every_layout(kind, threads):
    """Spread data are counted on one copy of the counters, data piling onto a few bins on
    several (chosen from a sample); pieces go to threads as they free up. Same counts."""
    rng = np.random.default_rng(4)
    n = 1_500_003
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "piled":
        x[rng.random(n) < 0.9] = np.float32(0.25)
    elif kind == "piled_late":  # the sample sees spread data, the tail is one value
        x[n // 2:] = np.float32(-1.0)
    elif kind == "nan_runs":
        x[::7] = np.nan
        x[1000:5000] = np.inf
    old = K.set_threads(threads)
    try:
        for isa in ("ref", K.isa()):
            with K.use_isa(isa):
                got = K.histogram(x, 2048, -4.0, 4.0)
                np.testing.assert_array_equal(got, O.histogram(x, 2048, -4.0, 4.0))
                got = K.histogram(x, 100_000, -4.0, 4.0)  # one counter copy, static split
                np.testing.assert_array_equal(got, O.histogram(x, 100_000, -4.0, 4.0))
    finally:
        K.set_threads(old)


def test_histogram_bad_args():
    x = np.ones(3, np.float32)
    for args in ((0, 0.0, 1.0), (4, 1.0, 1.0), (4, 0.0, float("nan")), (4, -3e38, 3e38), (1 << 30, 0.0, 1.0)):
        with pytest.raises(K.KernelError):
            K.histogram(x, *args)


@SETTINGS
@given(hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 1000)), st.floats(0, 100))
def test_percentile_matches_oracle(counts, p):
    if counts.sum() == 0:
        with pytest.raises(K.KernelError):
            K.percentile_from_histogram(counts, -1.0, 3.0, p)
        return
    got = K.percentile_from_histogram(counts, -1.0, 3.0, p)
    assert got == pytest.approx(O.percentile(counts, -1.0, 3.0, p), rel=1e-12, abs=1e-12)


def test_percentile_against_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(200_000).astype(np.float32)
    c = K.histogram(x, 4096, -6, 6)
    for p in (1, 50, 99.9):
        assert abs(K.percentile_from_histogram(c, -6, 6, p) - np.percentile(x, p)) < 12 / 4096 * 2


@pytest.mark.parametrize("nq", [8, 128])
def test_entropy_threshold_matches_oracle(nq):
    rng = np.random.default_rng(5)
    x = np.abs(rng.laplace(0, 1, 100_000)).astype(np.float32)
    hi = float(x.max())
    c = K.histogram(x, 512, 0.0, hi)
    got = K.entropy_threshold(c, 0.0, hi, nq)
    assert got == pytest.approx(O.entropy_threshold(c, hi, nq, folded=False), rel=1e-12)
    assert 0 < got <= hi
    # symmetric histogram of x (folded internally) == histogram of |x|
    xs = np.concatenate([x, -x])
    cs = K.histogram(xs, 1024, -hi, hi)
    assert K.entropy_threshold(cs, -hi, hi, nq) == pytest.approx(
        O.entropy_threshold(cs, hi, nq, folded=True), rel=1e-12)


def test_entropy_threshold_bad_ranges():
    with pytest.raises(K.KernelError):
        K.entropy_threshold(np.ones(10, np.int64), -1.0, 2.0)
    with pytest.raises(K.KernelError):
        K.entropy_threshold(np.zeros(10, np.int64), 0.0, 2.0)
    with pytest.raises(K.KernelError):
        K.entropy_threshold(np.ones(10, np.float64), 0.0, 2.0)


def test_streaming_histogram_grows_exactly():
    rng = np.random.default_rng(6)
    h = K.Histogram(bins=256)
    h.update(np.zeros(10, np.float32))  # zeros only: range not known yet
    assert h.percentile(50) == 0.0
    a = rng.standard_normal(10_000).astype(np.float32)
    b = (rng.standard_normal(10_000) * 10).astype(np.float32)
    h.update(a)
    r0 = h.range
    h.update(b)
    assert h.range >= np.abs(b).max() and math.log2(h.range / r0) == int(math.log2(h.range / r0))
    # same as re-binning every value at the final range, because the range only doubled
    allx = np.concatenate([np.zeros(10, np.float32), a, b])
    np.testing.assert_array_equal(h.counts.sum(), allx.size)
    direct = O.histogram(allx, 256, -h.range, h.range)
    # merged bins == direct binning at the final width (bin edges are nested; float32 rounding
    # of x + R may move a value sitting on an edge)
    assert np.abs(h.counts - direct).sum() <= 10
    assert h.minmax() == (float(allx.min()), float(allx.max()))
    t = h.entropy_threshold(64)
    assert 0 < t <= h.range
    assert h.abs_percentile(100) <= h.range
    h.update(np.array([np.nan, np.inf], np.float32))
    assert h.count == allx.size + 1
    with pytest.raises(K.KernelError):
        K.Histogram(bins=10)
