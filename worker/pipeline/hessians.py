"""Input Hessians of layers on calibration data: ``H = 2/n X^T X`` of what a layer multiplies its
weight with (a Conv's input unfolded to receptive fields), for every layer in one pass over the data.
SparseGPT prunes with it, data-aware low-rank factorizes with it."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Hashable

import numpy as np
import onnx
# scipy.linalg and threadpoolctl are imported where used: loading them (about 1 s of CPU) was paid by
# every job that imports the pipeline, static int8 among them, which never solves anything here

from worker.pipeline import activations, parallel
from worker.pipeline.data import Dataset
from worker.pipeline.sequential import lockstep
from worker.pipeline.unfold import output_size, unfold2d, unfold2d_every

CALIBRATION_BATCH = 64


@contextmanager
def serial_lapack():
    """BLAS / LAPACK on one thread inside: for the per-layer factorizations and solves (matrices of
    at most a few thousand rows), where OpenBLAS's second thread buys little on an idle machine and
    costs a lot on a busy one: its threads spin while they wait for each other, and with more
    threads than cores the Cholesky and triangular inverse of a 1536 x 1536 Hessian took 1.3 s of
    CPU on two threads against 0.22 s on one (load 20 on 2 cores; wall 7.0 s against 1.3 s). The
    Gram products over calibration rows run on one thread too (``gram``)."""
    with parallel.serial_blas():
        yield


DAMPING = 0.01          # relative to mean(diag H), as SparseGPT / GPTQ damp


def capture_hessians(model: onnx.ModelProto, data: Dataset,
                     plans: dict[str, list[tuple[Hashable, int, dict | None]]]) -> dict[Hashable, np.ndarray]:
    """``plans``: input tensor -> [(key, columns, conv geometry or None)]. Returns key -> H float64."""
    hessians = {key: np.zeros((columns, columns)) for group in plans.values() for key, columns, _ in group}
    rows = {key: 0 for key in hessians}
    sources = list(plans)
    for batch in activations.capture(model, data, sources, batch_size=CALIBRATION_BATCH):
        for source in sources:
            x = batch[source]
            for key, columns, geometry in plans[source]:
                flat = unfold2d(x, geometry) if geometry is not None else x.reshape(-1, columns)
                flat = flat.astype(np.float64)
                hessians[key] += flat.T @ flat
                rows[key] += flat.shape[0]
    for key, count in rows.items():
        if count:
            hessians[key] *= 2.0 / count
    return hessians


def damped(hessian: np.ndarray) -> np.ndarray:
    """H with never-active inputs (diag 0) given a unit diagonal, plus DAMPING * mean(diag H) * I."""
    hessian = hessian.copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices_from(hessian)] += DAMPING * float(np.mean(np.diag(hessian)))
    return hessian


def inverse_upper_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper triangular ``U`` with ``U^T U = H^-1`` (what SparseGPT and GPTQ sweep with), from one
    Cholesky factorization and one triangular inverse: with ``J`` the reversal, the Cholesky factor
    of ``J H J`` flipped back is an upper ``U'`` with ``H = U' U'^T``, so ``U = U'^-1``. The usual
    route (Cholesky, inverse, product, Cholesky again) costs ~3x the arithmetic, and a general
    inverse of the triangle (numpy's LU ``inv``) 6x that of LAPACK's triangular one. float64: the
    Cholesky of a calibration Hessian is where the precision is needed. Raises LinAlgError where H
    is not positive definite."""
    from scipy.linalg import lapack

    flipped, info = lapack.dpotrf(np.asarray(hessian, dtype=np.float64)[::-1, ::-1], lower=1, clean=1)
    if info:
        raise np.linalg.LinAlgError(f"the Hessian is not positive definite (leading minor {info})")
    inverse, info = lapack.dtrtri(np.ascontiguousarray(flipped[::-1, ::-1]), lower=0)
    if info:
        raise np.linalg.LinAlgError(f"the Cholesky factor is singular (pivot {info})")
    return np.triu(inverse)


def capture_drift(original: onnx.ModelProto, current: onnx.ModelProto, data: Dataset,
                  plans: dict[str, list[tuple[Hashable, int, dict | None]]]) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """For layers whose inputs changed because earlier layers were compressed: ``(H, C)`` with
    ``H = 2/n X~^T X~`` of the current model's input X~ and ``C = 2/n X^T X~`` against the original
    model's input X on the same samples."""
    found = {key: [np.zeros((columns, columns)), np.zeros((columns, columns)), 0]
             for group in plans.values() for key, columns, _ in group}
    sources = list(plans)
    pairs = zip(activations.capture(original, data, sources, batch_size=CALIBRATION_BATCH),
                activations.capture(current, data, sources, batch_size=CALIBRATION_BATCH))
    for before, after in pairs:
        for source in sources:
            for key, columns, geometry in plans[source]:
                x = unfold2d(before[source], geometry) if geometry is not None else before[source].reshape(-1, columns)
                x_now = unfold2d(after[source], geometry) if geometry is not None else after[source].reshape(-1, columns)
                x, x_now = x.astype(np.float64), x_now.astype(np.float64)
                found[key][0] += x_now.T @ x_now
                found[key][1] += x.T @ x_now
                found[key][2] += x.shape[0]
    return {key: (h * 2.0 / max(n, 1), c * 2.0 / max(n, 1)) for key, (h, c, n) in found.items()}


def drift_corrected(matrix: np.ndarray, hessian: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The weights ``M'`` (rows = outputs) that best reproduce the original outputs ``X M^T`` from
    the drifted inputs ``X~``, ridge-pulled towards M: ``min ||X M^T - X~ M'^T||^2 + lam ||M' - M||^2``
    gives ``M' = M (C + lam I)(H + lam I)^-1`` (``lam`` the usual damping), which is M itself when
    the inputs did not drift (C = H)."""
    return drift_refit(matrix, hessian, matrix @ cross)


def drift_refit(matrix: np.ndarray, hessian: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """``drift_corrected`` from ``P = M C`` (what ``accumulate_drift`` gives with ``weights``):
    ``M' = (P + lam M)(H + lam I)^-1``, solved through the Cholesky factor of the symmetric
    positive definite ``H + lam I`` (half the arithmetic of a general solve)."""
    from scipy.linalg import cho_factor, cho_solve

    lam = DAMPING * float(np.mean(np.diag(hessian))) or DAMPING
    regularized = np.array(hessian, dtype=np.float64)
    regularized[np.diag_indices_from(regularized)] += lam
    rhs = (np.asarray(projected, dtype=np.float64) + lam * np.asarray(matrix, dtype=np.float64)).T
    try:
        return cho_solve(cho_factor(regularized, lower=True, check_finite=False), rhs, check_finite=False).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(regularized, rhs, rcond=None)[0].T


GRAM_ROWS = 4096            # rows per float32 piece of the layer-wise statistics (summed in float64)
GRAM_MIN_ROWS = 256         # a split into pieces smaller than this costs more than it saves


def gram(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``a^T b`` (``a^T a`` without ``b``) of one batch's rows in float32 BLAS, returned as float64
    for the running sum: per batch the float32 product's relative error stays ~1e-6, and summing
    the batches in float64 keeps it there however many batches come (a float64 product of the same
    rows costs twice the time and copies them twice the size). ``a^T a`` is BLAS's symmetric
    product (syrk, half the arithmetic of a general one).

    One product per batch, on the BLAS threads the caller allows (the statistics run it on one:
    ``serial_lapack``): splitting its rows over the cores (as layer-wise distillation does,
    ``row_pieces``) sums the same numbers in another order, and SparseGPT's and GPTQ's outputs move
    with that order (MiniLM: SparseGPT's rel_l2 0.1644 -> 0.1678, GPTQ int4's 0.1860 -> 0.1909,
    where main's own code moves to 0.1695 / 0.1878 with 64-sample batches instead of 32): one
    product keeps them where they were."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if b is None:
        return (a.T @ a).astype(np.float64)
    return (a.T @ np.ascontiguousarray(b, dtype=np.float32)).astype(np.float64)


def row_pieces(rows: int) -> list[slice]:
    """``rows`` cut into pieces of at most GRAM_ROWS, at least one per core (none under
    GRAM_MIN_ROWS rows unless there are fewer rows than that); never empty."""
    pieces = max(parallel.cores(), -(-rows // GRAM_ROWS))
    step = max(GRAM_MIN_ROWS, -(-rows // pieces))
    return [slice(start, start + step) for start in range(0, max(rows, 1), step)]


UNFOLD_BYTES = 64 << 20     # a Conv input is unfolded (im2col) at most this much at a time


def _chunks(x: np.ndarray, columns: int, geometry: dict | None) -> list[tuple[int, int]]:
    """Sample ranges of ``x`` whose unfolded rows stay within UNFOLD_BYTES (a 3x3 Conv over 96
    channels at 120 x 120 unfolds to 50 MB per image: a batch of 16 was 0.8 GB at once)."""
    if geometry is None or x.ndim < 1 or x.shape[0] <= 1:
        return [(0, x.shape[0] if x.ndim else 1)]
    per_sample = max(int(np.prod(x.shape[2:])) * columns * 4, 1)
    step = max(1, UNFOLD_BYTES // per_sample)
    return [(start, min(start + step, x.shape[0])) for start in range(0, x.shape[0], step)]


ROWS_PER_SAMPLE = 4096      # receptive fields per sample a Conv's Hessian takes (evenly strided)


def _rows(x: np.ndarray, columns: int, geometry: dict | None) -> np.ndarray:
    """The layer's input rows; a Conv's receptive fields, every k-th where one sample has more than
    ROWS_PER_SAMPLE of them. A 3 x 3 Conv over 96 channels at 120 x 120 has 14400 fields of 864
    columns per image: on 16 images H alone is 340 GFLOP, where a quarter of the fields (still 67x
    the columns) gives the same H to within sampling noise. Row ranks and MatMul rows are all kept."""
    if geometry is None:
        return x.reshape(-1, columns)
    ho, wo = output_size(x.shape[2], x.shape[3], geometry)
    per_sample = ho * wo
    return unfold2d_every(x, geometry, -(-per_sample // ROWS_PER_SAMPLE))


def _timed(batches, cost, name: str):
    """The batches of a propagation, with the time spent producing them counted as ``name``."""
    iterator = iter(batches)
    while True:
        if cost is None:
            item = next(iterator, None)
        else:
            with cost.phase(name):
                item = next(iterator, None)
        if item is None:
            return
        yield item


def _views(group: list[tuple[Hashable, int, dict | None]]) -> list[tuple[list[Hashable], int, dict | None]]:
    """The keys of one input's plan by the way they see the input (columns, Conv geometry), as
    ``(keys, columns, geometry)``: layers that see it alike (Q, K and V projections, Convs of one
    shape over one tensor) have one Hessian, computed once."""
    views: dict[tuple, tuple[list[Hashable], int, dict | None]] = {}
    for key, columns, geometry in group:
        how = (columns, repr(sorted(geometry.items())) if geometry else None)
        views.setdefault(how, ([], columns, geometry))[0].append(key)
    return list(views.values())


def accumulate_hessians(batches, plans: dict[str, list[tuple[Hashable, int, dict | None]]],
                        cost=None) -> dict[Hashable, np.ndarray]:
    """``capture_hessians`` over batches a propagation streams (``{source: value}`` per batch).
    Keys that see their input alike share one matrix (the same array: read it, do not change it)."""
    views = {source: _views(group) for source, group in plans.items()}
    sums = {keys[0]: np.zeros((columns, columns)) for group in views.values() for keys, columns, _ in group}
    rows = {key: 0 for key in sums}
    for batch in _timed(batches, cost, "capture"):
        # BLAS on one thread: OpenBLAS's second thread spins while it waits on a busy machine
        # (2.8x the CPU of one thread for a 14400 x 864 X^T X at load 15 on 2 cores)
        with cost.phase("statistics") if cost is not None else nullcontext(), parallel.serial_blas():
            for source, group in views.items():
                for keys, columns, geometry in group:
                    x = batch[source]
                    for start, stop in _chunks(x, columns, geometry):
                        flat = _rows(x[start:stop] if geometry is not None else x, columns, geometry)
                        sums[keys[0]] += gram(flat)
                        rows[keys[0]] += flat.shape[0]
    hessians = {}
    for group in views.values():
        for keys, _, _ in group:
            if rows[keys[0]]:
                sums[keys[0]] *= 2.0 / rows[keys[0]]
            hessians.update((key, sums[keys[0]]) for key in keys)
    return hessians


def accumulate_drift(reference, current, plans: dict[str, list[tuple[Hashable, int, dict | None]]],
                     cost=None, weights: dict[Hashable, np.ndarray] | None = None
                     ) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """``capture_drift`` over two propagations in lockstep: the original model's (``reference``)
    and the one being changed (``current``), on the same samples. Keys that see their input alike
    share one ``H`` (and ``C``).

    With ``weights`` (key -> ``M``, rows = outputs, for every key) the second matrix of each key is
    ``P = M C`` (what ``drift_refit`` takes) rather than ``C``. For a layer with fewer outputs than
    half its inputs (a BERT's FFN down-projection: 384 of 1536) ``P`` is summed as ``Y^T X~`` with
    ``Y = X M^T`` the original outputs: ``4 r K N`` flops a batch of ``r`` rows where ``X^T X~``
    is ``2 r K^2``; otherwise ``C`` is summed once for the keys sharing it and multiplied at the end."""
    found: dict[Hashable, list] = {}
    views = []
    for source, group in plans.items():
        for keys, columns, geometry in _views(group):
            outputs = sum(weights[k].shape[0] for k in keys) if weights is not None else None
            direct = [] if outputs is None or 2 * outputs >= columns else keys
            views.append((source, keys, columns, geometry, direct))
            found[keys[0]] = [np.zeros((columns, columns)),
                              np.zeros((columns, columns)) if len(direct) < len(keys) else None, 0,
                              {k: np.zeros((weights[k].shape[0], columns)) for k in direct}]
    projections = {k: np.ascontiguousarray(np.asarray(weights[k], dtype=np.float32).T)
                   for _, _, _, _, direct in views for k in direct}
    for before, after in _timed(lockstep(reference, current), cost, "capture"):
        # BLAS on one thread: OpenBLAS's second thread spins while it waits on a busy machine
        # (2.8x the CPU of one thread for a 14400 x 864 X^T X at load 15 on 2 cores)
        with cost.phase("statistics") if cost is not None else nullcontext(), parallel.serial_blas():
            for source, keys, columns, geometry, direct in views:
                sums = found[keys[0]]
                a, b = before[source], after[source]
                for start, stop in _chunks(a, columns, geometry):
                    part = slice(start, stop) if geometry is not None else slice(None)
                    x, x_now = _rows(a[part], columns, geometry), _rows(b[part], columns, geometry)
                    sums[0] += gram(x_now)
                    if sums[1] is not None:
                        sums[1] += gram(x, x_now)
                    for key in direct:
                        sums[3][key] += gram(np.ascontiguousarray(x, dtype=np.float32) @ projections[key], x_now)
                    sums[2] += x.shape[0]
    out: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
    for _, keys, _, _, direct in views:
        h, c, n, direct_sums = found[keys[0]]
        scale = 2.0 / max(n, 1)
        h *= scale
        if c is not None:
            c *= scale
        for key in keys:
            if weights is None:
                out[key] = (h, c)
            elif key in direct_sums:
                out[key] = (h, direct_sums[key] * scale)
            else:
                out[key] = (h, np.asarray(weights[key], dtype=np.float64) @ c)
    return out


def log_propagation(log, *propagations) -> None:
    """What the propagations cost, for the step's metrics: sessions built, restarts, spilled batches."""
    log.extra["propagation"] = [{"segments": p.stats.segments, "nodes": p.stats.nodes, "restarts": p.stats.restarts,
                        "spilled_batches": p.stats.spilled,
                        "peak_held_bytes": max(p.stats.held_bytes, default=0)} for p in propagations]
