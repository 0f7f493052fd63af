"""The solvers' use of the cores: row-split float32 Gram products agree with float64 ones, pieces
cover every row once, the pool keeps order and runs BLAS serially; layer-wise masked solves in
scaled float32 agree with float64 ones per column; the error statistics measure a near-exact fit
far below what ||T||^2-based float32 statistics could."""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info

from worker.pipeline import parallel
from worker.pipeline.distill import layerwise
from worker.pipeline.hessians import GRAM_ROWS, gram, row_pieces


def test_row_pieces_cover_every_row_once_and_feed_every_core():
    for rows in (0, 1, 255, 256, 1000, GRAM_ROWS, 3 * GRAM_ROWS + 17):
        pieces = row_pieces(rows)
        covered = np.concatenate([np.arange(rows)[p] for p in pieces]) if rows else np.arange(0)
        np.testing.assert_array_equal(covered, np.arange(rows))
        assert pieces
        assert all(p.stop - p.start <= max(GRAM_ROWS, 256) for p in pieces)
    assert len(row_pieces(10_000)) >= parallel.cores()


def test_gram_matches_float64_products():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GRAM_ROWS + 999, 40)).astype(np.float32) + 3.0
    b = rng.standard_normal((GRAM_ROWS + 999, 7)).astype(np.float32)
    a64 = a.astype(np.float64)
    want, want_cross = a64.T @ a64, a64.T @ b
    got, got_cross = gram(a), gram(a, b)
    assert got.dtype == np.float64 and got.shape == (40, 40)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert np.abs(got_cross - want_cross).max() < 1e-5 * (np.abs(a64).T @ np.abs(b)).max()
    np.testing.assert_array_equal(gram(a[:0]), np.zeros((40, 40)))


def test_map_serial_keeps_order_and_runs_blas_on_one_thread():
    def blas_threads(_):
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    assert list(parallel.map_serial(lambda x: x * x, range(50))) == [x * x for x in range(50)]
    assert set(parallel.map_serial(blas_threads, range(8))) == {1}
    with parallel.serial_blas():
        with parallel.serial_blas():          # re-entrant
            assert blas_threads(None) == 1
        assert blas_threads(None) == 1


def test_masked_solve_in_scaled_float32_matches_float64_per_column():
    """An ill-scaled system (input scales over 6 decades, as activations of different layers are)
    with a bias row: every column's solve over its own kept rows agrees with numpy's float64 one."""
    rng = np.random.default_rng(1)
    k, n, rows = 60, 9, 500
    a = rng.standard_normal((rows, k)) * np.logspace(-3, 3, k)
    t = a @ rng.standard_normal((k, n)) + rng.standard_normal((rows, n))
    st = layerwise.Statistics(a.T @ a, a.T @ t, a.sum(0), t.sum(0), float((t * t).sum()), rows)
    keep = rng.random((k, n)) < 0.5
    keep[:, 1] = keep[:, 0]                       # two columns sharing one pattern
    lam = layerwise._ridge(st, 0.01)
    w, b = layerwise.solve_float(st, lam, True, keep, np.zeros((k, n)))
    system, rhs = layerwise._augmented(st, lam, True, np.zeros((k, n)))
    for j in range(n):
        kept = np.append(np.flatnonzero(keep[:, j]), k)
        want = np.linalg.solve(system[np.ix_(kept, kept)], rhs[kept, j])
        np.testing.assert_allclose(w[kept[:-1], j], want[:-1], rtol=1e-4, atol=1e-6 * np.abs(want[:-1]).max())
        np.testing.assert_allclose(b[j], want[-1], rtol=1e-4)
        assert np.all(w[~keep[:, j], j] == 0)


class _Rows:
    """A layer whose design and targets are the rows themselves."""

    node = None

    @staticmethod
    def design(x):
        return [x]

    @staticmethod
    def targets(y):
        return [y]


def test_error_statistics_measure_a_near_exact_fit():
    """A fit 1e-5 off its targets: measured from the error of a reference close to it, the float32
    statistics give its residual to a few percent; the float64 truth is the check."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6000, 64)).astype(np.float32)
    w_true = rng.standard_normal((64, 16))
    t = (a @ w_true + 1e-5 * rng.standard_normal((6000, 16))).astype(np.float32)
    reference = w_true + 1e-3 * rng.standard_normal(w_true.shape)
    st = layerwise.accumulate(_Rows(), [(a[:3000], t[:3000]), (a[3000:], t[3000:])], base=[(reference, None)])[0]
    for w in (w_true, reference):
        truth = float(np.sum((a.astype(np.float64) @ w - t) ** 2))
        assert abs(layerwise.residual(st, w, None) - truth) < 0.05 * truth
    assert st.rows == 6000
    # C and t, derived from the error statistics, are the data's own
    a64, t64 = a.astype(np.float64), t.astype(np.float64)
    assert np.abs(st.cross - a64.T @ t64).max() < 1e-5 * np.abs(a64.T @ t64).max()
    np.testing.assert_allclose(st.target_sum, t64.sum(axis=0), rtol=1e-4, atol=1e-3)
    assert abs(st.target_sq - float(np.sum(t.astype(np.float64) ** 2))) < 1e-9 * st.target_sq


def test_a_forked_child_gets_a_pool_of_its_own():
    """A child forked after the parent used the pool must not wait on the parent's threads."""
    import multiprocessing

    assert list(parallel.map_serial(abs, [-1, -2, -3])) == [1, 2, 3]
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_squares_in_pool).get(timeout=60) == [0, 1, 4, 9]


def _squares_in_pool():
    return list(parallel.map_serial(lambda x: x * x, range(4)))
