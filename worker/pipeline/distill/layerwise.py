"""Layer-wise reconstruction: refit every compressed layer so its outputs on the *student's own*
inputs match the *teacher's* outputs of the same layer on calibration data.

For one layer (one group of a grouped Conv), with ``A`` its input rows in the student and ``T`` the
teacher's output rows, both accumulated over the calibration batches,

    H = A^T A,  C = A^T T,  s = A^T 1,  t = T^T 1,  n = rows,

the ridge problem ``min_W,b ||A W + 1 b^T - T||^2 + lam ||W - W_0||^2`` (``lam = damping * mean(diag H)``,
``W_0`` the weights the earlier step left, so damping pulls towards them rather than towards zero;
the bias not penalized) has the closed form
``[W; b] = [[H + lam I, s], [s^T, n]]^-1 [C + lam W_0; t^T]``.
Constraints earlier steps left are kept exactly:

- sparsity mask: each output column ``j`` is solved over its kept inputs ``S_j`` only,
  ``W[S_j, j] = (H[S_j, S_j] + lam I)^-1 C[S_j, j]`` (columns with the same mask share one solve);
  the rest stay zero.
- quantization grid: the float solution is rounded onto the *same* grid (scales and zero points
  unchanged) input row by input row, each row's rounding error spread over the rows not yet rounded
  with the inverse of ``H + lam I`` (optimal-brain / GPTQ rounding: it minimises the same
  ``||A (W - W_q)||^2`` the fit does); then the bias is refit given the rounded weights,
  ``b = (t - W_q^T s) / n``.
- codebook (weight sharing): every weight keeps its centroid, the centroid values ``c`` are refit:
  ``W = sum_k c_k M_k`` is linear in ``c``, so ``G c = r`` with ``G_kl = <M_k, H M_l>``,
  ``r_k = <M_k, C>`` (the bias eliminated through its own normal equation); a zero centroid (pruned
  weights) stays zero. Where the graph stores labels and codebook, only the codebook is rewritten.
- low rank ``U V``: where the second factor's layer is pointwise over the first's output (MatMul /
  Gemm pairs, k x k Conv then 1 x 1 Conv), both factors are refit by alternating least squares from
  the first factor's input statistics: ``V, b`` by the ridge solve on ``(U^T H U, U^T C)``, then ``U``
  from ``H U (V V^T) + lam U = (C - s b^T) V^T + lam U_0`` (one ridge system per eigenvector of
  ``V V^T``), ``ALS_ITERATIONS`` rounds; otherwise (spatial Conv pairs, factors quantized later)
  ``V``'s layer alone is refit on the student's ``U`` outputs. The rank cannot change because the
  factor shapes do not.

Layers go in the student's topological order, and each layer's inputs are captured from the
student *after* the layers before it were refit, so the fit also corrects the drift they pass on.
The inputs come from sequential propagation (``worker.pipeline.sequential``): the samples cross each
model once, not once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
from scipy.linalg import lapack

from worker.pipeline import graph, parallel
from worker.pipeline.cost import CostMeter, LayerClock
from worker.pipeline.data import Dataset
from worker.pipeline.hessians import row_pieces, serial_lapack
from worker.pipeline.sequential import DEFAULT_BUDGET, Propagation, lockstep
from worker.pipeline.distill.layers import Grid, LinearLayer


@dataclass
class Constraints:
    """What must hold for a layer's weight after the fit (weight layout, not columns)."""

    mask: np.ndarray | None = None       # True where a weight may be non-zero
    codebook: np.ndarray | None = None   # centroid values; each weight keeps its centroid


@dataclass
class Statistics:
    """Sufficient statistics of one group: enough to fit and to measure the fit.

    With a reference fit ``(W_0, b_0)`` (``base_w`` / ``base_b``, the layer's weights before the
    refit) the statistics of its error ``E = T - A W_0 - 1 b_0^T`` are kept too, and ``residual``
    measures a fit from them: ``||E - A D - 1 d^T||^2`` with ``D = W - W_0``, every term of the size
    of the error rather than of ``||T||^2``. The products are float32 (~1e-6 relative), which
    measured from ``||T||^2`` would put a floor of ~1e-3 under any rel_l2; measured from ``E`` the
    floor is ~1e-3 of the reference fit's own rel_l2."""

    hessian: np.ndarray        # H = A^T A   [K, K]
    cross: np.ndarray          # C = A^T T   [K, N]
    input_sum: np.ndarray      # s = A^T 1   [K]
    target_sum: np.ndarray     # t = T^T 1   [N]
    target_sq: float           # ||T||^2
    rows: int
    base_w: np.ndarray | None = None        # W_0 [K, N], the reference fit (None: no error statistics)
    base_b: np.ndarray | None = None        # b_0 [N] (None: no bias)
    error_cross: np.ndarray | None = None   # A^T E [K, N]
    error_sum: np.ndarray | None = None     # E^T 1 [N]
    error_sq: float = 0.0                   # ||E||^2


def _pieces_statistics(a: np.ndarray, t: np.ndarray, base: tuple[np.ndarray, np.ndarray | None] | None
                       ) -> list:
    """One batch's ``[A^T A, ||T||^2, A^T T, T^T 1]``, or with ``base`` ``[A^T A, ||T||^2, A^T E,
    E^T 1, ||E||^2]`` (``A^T T`` follows from ``A^T E`` and costs as much again: ``accumulate``
    derives it); float32 products over row pieces on every core (``hessians.row_pieces``),
    summed in float64."""
    w0 = None if base is None else np.ascontiguousarray(base[0], dtype=np.float32)
    b0 = None if base is None or base[1] is None else np.asarray(base[1], dtype=np.float32)

    def piece(part: slice) -> list:
        ap, tp = a[part], t[part]
        found = [ap.T @ ap, float(np.einsum("ij,ij->", tp, tp, dtype=np.float64))]
        if w0 is None:
            return found + [ap.T @ tp, tp.sum(axis=0, dtype=np.float64)]
        error = tp - ap @ w0
        if b0 is not None:
            error -= b0
        return found + [ap.T @ error, error.sum(axis=0, dtype=np.float64),
                        float(np.einsum("ij,ij->", error, error, dtype=np.float64))]

    total = None
    for found in parallel.map_serial(piece, row_pieces(a.shape[0])):
        found = [np.asarray(v, dtype=np.float64) if isinstance(v, np.ndarray) else v for v in found]
        total = found if total is None else [x + y for x, y in zip(total, found)]
    return total


def accumulate(layer: LinearLayer, batches: Sequence[tuple[np.ndarray, np.ndarray]] | object,
               base: list[tuple[np.ndarray, np.ndarray | None]] | None = None) -> list[Statistics]:
    """Sum the statistics over ``(student input, teacher output)`` batches, float64 sums; with
    ``base`` (per group ``(W_0, b_0)``, see ``Statistics``) the error statistics, from which
    ``C = A^T E + H W_0 + s b_0^T`` and ``t = E^T 1 + W_0^T s + n b_0`` follow at the end.

    The products are float32 BLAS over row pieces summed in float64, on every core: a float64
    product of the same rows took twice the time and copied them twice the size (the encoder's FFN
    down-projection: 13k rows of 1536)."""
    stats: list[Statistics] | None = None
    for x, y in batches:
        designs, targets = layer.design(x), layer.targets(y)
        if stats is None:
            stats = []
            for g, (a, t) in enumerate(zip(designs, targets)):
                k, n = a.shape[1], t.shape[1]
                st = Statistics(np.zeros((k, k)), np.zeros((k, n)), np.zeros(k), np.zeros(n), 0.0, 0)
                if base is not None:
                    st.base_w = np.asarray(base[g][0], dtype=np.float64)
                    st.base_b = None if base[g][1] is None else np.asarray(base[g][1], dtype=np.float64)
                    st.error_cross, st.error_sum = np.zeros((k, n)), np.zeros(n)
                stats.append(st)
        for g, (st, a, t) in enumerate(zip(stats, designs, targets)):
            if a.shape[0] != t.shape[0]:
                raise ValueError(f"layer {layer.node.name}: {a.shape[0]} input rows but {t.shape[0]} output rows")
            a, t = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(t, dtype=np.float32)
            found = _pieces_statistics(a, t, base[g] if base is not None else None)
            st.hessian += found[0]
            st.target_sq += found[1]
            if base is None:
                st.cross += found[2]
                st.target_sum += found[3]
            else:
                st.error_cross += found[2]
                st.error_sum += found[3]
                st.error_sq += found[4]
            st.input_sum += a.sum(axis=0, dtype=np.float64)
            st.rows += a.shape[0]
    if stats is None:
        raise ValueError("no calibration batches")
    if base is not None:
        for st in stats:
            st.cross = st.error_cross + st.hessian @ st.base_w
            st.target_sum = st.error_sum + st.base_w.T @ st.input_sum
            if st.base_b is not None:
                st.cross += np.outer(st.input_sum, st.base_b)
                st.target_sum += st.rows * st.base_b
    return stats


def residual(st: Statistics, w: np.ndarray, b: np.ndarray | None) -> float:
    """||A W + 1 b^T - T||^2 from the statistics alone (no second pass over the data); from the
    error statistics, as ``||E - A D - 1 d^T||^2``, where the statistics have them."""
    w = np.asarray(w, dtype=np.float64)
    b = None if b is None else np.asarray(b, dtype=np.float64)
    if st.base_w is not None:
        w = w - st.base_w
        if st.base_b is not None:
            b = -st.base_b if b is None else b - st.base_b
        cross, target_sum, target_sq = st.error_cross, st.error_sum, st.error_sq
    else:
        cross, target_sum, target_sq = st.cross, st.target_sum, st.target_sq
    value = float(np.sum(w * (st.hessian @ w))) - 2.0 * float(np.sum(w * cross)) + target_sq
    if b is not None:
        value += 2.0 * float(b @ (w.T @ st.input_sum)) - 2.0 * float(b @ target_sum) + st.rows * float(b @ b)
    return max(value, 0.0)


def _ridge(st: Statistics, damping: float) -> float:
    diag = np.diag(st.hessian)
    mean = float(diag.mean()) if diag.size else 0.0
    # a floor keeps the system solvable when damping is 0 and some input never fires
    return damping * mean if mean > 0 else 1e-8


def _solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrix^-1 rhs`` for a symmetric positive definite ``matrix`` (a ridge-damped Gram matrix):
    LAPACK's Cholesky solve, half the arithmetic of the LU one; ``_solve`` where the Cholesky
    fails (a system that is not positive definite after all)."""
    # the transpose of a C-ordered matrix is the same memory in Fortran order, which LAPACK takes
    # without a transposing copy (a third of the time at 768 x 768); its upper triangle is the
    # matrix's lower one
    _, solution, info = lapack.dposv(np.asarray(matrix).T, rhs, lower=0)
    return solution if info == 0 else _solve(matrix, rhs)


def _masked_solve(system: np.ndarray, rhs: np.ndarray, keep: np.ndarray, with_bias: bool) -> np.ndarray:
    """Each column ``j`` of ``rhs`` solved over its kept rows ``S_j`` only (the rest of the solution
    zero): ``system[S_j, S_j]^-1 rhs[S_j, j]``, one solve per distinct mask pattern. After an
    unstructured prune nearly every column has a pattern of its own (the encoder's FFN
    down-projection: 384 solves of ~768), so the gather and the factorization are the cost:

    - float32: the system is scaled to a unit diagonal (``D^-1/2 S D^-1/2``, which leaves the
      solution exact up to rounding and brings the condition number down to the correlation's),
      then gathered and solved in float32 (LAPACK's Cholesky solve ``sposv``): half the bytes to
      gather and half the arithmetic of float64. On the encoder's down-projection its residual
      ||A W + 1 b^T - T||^2 agreed with float64's to 1e-8 relative. A pattern whose float32
      factorization fails is solved in float64 (``_solve_spd``).
    - the patterns go to both cores (``worker.pipeline.parallel``), each solve on one BLAS thread.

    The submatrix is gathered with two ``take`` calls (row, then column): 2/3 of the time of
    ``np.ix_``."""
    k = keep.shape[0]
    diagonal = np.diag(system)
    scale = 1.0 / np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    scaled = (system * scale[:, None] * scale[None, :]).astype(np.float32)
    # outputs as rows: a pattern's right-hand sides are a few rows of it, not a slice of every row
    scaled_rhs = np.ascontiguousarray((rhs * scale[:, None]).T, dtype=np.float32)
    solution = np.zeros((system.shape[0], rhs.shape[1]))
    patterns, inverse = np.unique(keep.T, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(patterns) + 1))

    def solve(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        columns = order[bounds[index]:bounds[index + 1]]
        rows = np.flatnonzero(patterns[index])
        if with_bias:
            rows = np.append(rows, k)
        if rows.size == 0:
            return None
        sub = scaled.take(rows, axis=0).take(rows, axis=1)
        # the transpose of a C-ordered matrix is its Fortran-ordered self, which LAPACK takes
        # without a copy; symmetric, so either triangle is the matrix's
        _, part, info = lapack.sposv(sub.T, scaled_rhs.take(columns, axis=0).take(rows, axis=1).T,
                                     lower=0, overwrite_a=1, overwrite_b=1)
        if info == 0:
            return rows, columns, part.astype(np.float64) * scale[rows, None]
        return rows, columns, _solve_spd(system.take(rows, axis=0).take(rows, axis=1),
                                         rhs.take(rows, axis=0).take(columns, axis=1))

    def solve_all(indices: range) -> list:
        return [solve(index) for index in indices]

    # a few runs of patterns per core, not one task per pattern: the up-projection's 1536 solves
    # of ~192 took more CPU as single tasks than serially
    tasks = 4 * parallel.cores()
    for found in parallel.map_serial(solve_all, [range(len(patterns))[i::tasks] for i in range(tasks)]):
        for rows, columns, part in filter(None, found):
            solution[np.ix_(rows, columns)] = part
    return solution


def _augmented(st: Statistics, lam: float, with_bias: bool, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = st.hessian.shape[0]
    cross = st.cross + lam * np.asarray(prior, dtype=np.float64)
    if not with_bias:
        return st.hessian + lam * np.eye(k), cross
    system = np.empty((k + 1, k + 1))
    system[:k, :k] = st.hessian + lam * np.eye(k)
    system[:k, k] = system[k, :k] = st.input_sum
    system[k, k] = st.rows
    return system, np.vstack([cross, st.target_sum[None, :]])


def solve_float(st: Statistics, lam: float, with_bias: bool, keep: np.ndarray | None,
                prior: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge least squares for ``[W; b]`` pulled towards ``prior``; with ``keep`` ([K, N] bool) each
    column over its kept rows."""
    k, n = st.cross.shape
    system, rhs = _augmented(st, lam, with_bias, prior)
    if keep is None:
        solution = _solve_spd(system, rhs)
    else:
        solution = _masked_solve(system, rhs, keep, with_bias)
    w = solution[:k]
    b = solution[k] if with_bias else None
    return w, b


def refit_bias(st: Statistics, w: np.ndarray) -> np.ndarray:
    """The best bias for fixed weights: ``b = (t - W^T s) / n``."""
    return (st.target_sum - np.asarray(w, dtype=np.float64).T @ st.input_sum) / max(st.rows, 1)


def round_on_grid(w: np.ndarray, st: Statistics, lam: float, grid: Grid, keep: np.ndarray | None) -> np.ndarray:
    """Integers on ``grid`` (columns layout, [K, N]) for the float solution ``w``, row by row, each
    row's rounding error compensated on the later rows through ``(H + lam I)^-1`` (GPTQ's update
    with the upper Cholesky factor ``U`` of the inverse: ``W[j+1:] -= U[j, j+1:]^T err_j / U[j, j]``)."""
    k = w.shape[0]
    system = st.hessian + lam * np.eye(k)
    try:
        inverse = np.linalg.inv(system)
        upper = np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError:
        upper = None
    work = np.array(w, dtype=np.float64)
    q = np.empty(w.shape, dtype=np.int64)
    for j in range(k):
        row_grid = Grid(grid.scale[j], grid.zero_point[j], grid.qmin, grid.qmax, grid.sign)
        q[j] = row_grid.quantize(work[j])
        if keep is not None:
            q[j] = np.where(keep[j], q[j], grid.zero_point[j])
        if upper is None or j + 1 == k:
            continue
        error = (work[j] - row_grid.dequantize(q[j])) / upper[j, j]
        work[j + 1:] -= np.outer(upper[j, j + 1:], error)
        if keep is not None:
            work[j + 1:] *= keep[j + 1:]
    return q


def solve_codebook(stats: list[Statistics], labels: list[np.ndarray], codebook: np.ndarray, damping: float,
                   with_bias: bool) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Refit the centroid values (assignments kept) over every group together. ``labels[g]`` is
    ``[K_g, N_g]`` with -1 where the weight is pruned."""
    count = codebook.size
    gram = np.zeros((count, count))
    rhs = np.zeros(count)
    couplings = []
    for st, lab in zip(stats, labels):
        members = [(lab == c).astype(np.float64) for c in range(count)]
        h_members = [st.hessian @ m for m in members]
        for a in range(count):
            rhs[a] += float(np.sum(members[a] * st.cross))
            for b in range(a, count):
                gram[a, b] += float(np.sum(members[a] * h_members[b]))
        if with_bias:
            # E[c, j] = s^T M_c[:, j]: how centroid c moves column j's sum
            coupling = np.stack([st.input_sum @ m for m in members])
            couplings.append(coupling)
    gram = np.triu(gram) + np.triu(gram, 1).T
    if with_bias:
        for st, coupling in zip(stats, couplings):
            gram -= coupling @ coupling.T / max(st.rows, 1)
            rhs -= coupling @ st.target_sum / max(st.rows, 1)
    used = np.diag(gram) > 0
    centroids = np.array(codebook, dtype=np.float64)
    if used.any():
        sub = gram[np.ix_(used, used)]
        lam = damping * float(np.diag(sub).mean())
        centroids[used] = _solve(sub + lam * np.eye(sub.shape[0]), rhs[used])
    biases = None
    if with_bias:
        biases = [(st.target_sum - centroids @ coupling) / max(st.rows, 1) for st, coupling in zip(stats, couplings)]
    return centroids, biases


@dataclass
class LayerFit:
    """One layer to refit: the student's layer, the teacher tensor it must match, its constraints."""

    key: str                       # the ctx.layers key (original weight name)
    layer: LinearLayer
    target: str                    # the teacher's tensor holding the same layer's output
    constraints: Constraints
    first: LinearLayer | None = None   # low rank: the first factor's layer, when both factors are refit
    target_channels: list[int] | None = None   # channel pruning: the teacher's output channels that survive


ALS_ITERATIONS = 4


def _projected(st: Statistics, u: np.ndarray) -> Statistics:
    """Statistics of ``Z = A U`` (the first factor's output) from those of ``A``."""
    return Statistics(u.T @ st.hessian @ u, u.T @ st.cross, u.T @ st.input_sum, st.target_sum, st.target_sq, st.rows)


def _solve_first_factor(st: Statistics, v: np.ndarray, b: np.ndarray | None, u0: np.ndarray, lam: float) -> np.ndarray:
    """``min_U ||A U V + 1 b^T - T||^2 + lam ||U - U0||^2``: ``H U G + lam U = R`` with ``G = V V^T``,
    ``R = (C - s b^T) V^T + lam U0``; diagonalising ``G = Q L Q^T`` splits it into one ridge system
    per column of ``U Q``: ``(l_i H + lam I) u_i = (R Q)_i``."""
    rhs = st.cross if b is None else st.cross - np.outer(st.input_sum, b)
    rhs = rhs @ v.T + lam * u0
    eigenvalues, basis = np.linalg.eigh(v @ v.T)
    rotated = rhs @ basis
    k = st.hessian.shape[0]
    columns = [_solve(eigenvalues[i] * st.hessian + lam * np.eye(k), rotated[:, i]) for i in range(v.shape[0])]
    return np.stack(columns, axis=1) @ basis.T


def fit_lowrank(student: onnx.ModelProto, first: LinearLayer, second: LinearLayer, stats: Statistics,
                damping: float) -> dict:
    """Alternating least squares on both factors of ``T ~ A U V + 1 b^T`` (rank fixed by their shapes),
    from the statistics of the first factor's input ``A``; ``student`` mutated when it helps."""
    with_bias = second.bias is not None
    u0 = first.to_columns(first.weight.read(student))[0].astype(np.float64)
    v0 = second.to_columns(second.weight.read(student))[0].astype(np.float64)
    b0 = second.bias_columns(graph.get_array(student, second.bias.name))[0] if with_bias else None
    before = residual(_projected(stats, u0), v0, b0)
    lam_u = _ridge(stats, damping)
    u, v, b = u0, v0, b0
    for _ in range(ALS_ITERATIONS):
        projected = _projected(stats, u)
        v, b = solve_float(projected, _ridge(projected, damping), with_bias, None, v)
        u = _solve_first_factor(stats, v, b, u, lam_u)
    projected = _projected(stats, u)
    v, b = solve_float(projected, _ridge(projected, damping), with_bias, None, v)
    after = residual(projected, v, b)
    scale = max(stats.target_sq, 1e-30)
    if after >= before:
        return {"rel_l2_before": float(np.sqrt(before / scale)), "rel_l2_after": float(np.sqrt(before / scale)),
                "kept": True}
    first.weight.write_float(student, first.from_columns([u]))
    second.weight.write_float(student, second.from_columns([v]))
    if with_bias:
        old = graph.get_array(student, second.bias.name)
        graph.set_array(student, second.bias.name, second.bias_from_columns([b]).astype(old.dtype))
    return {"rel_l2_before": float(np.sqrt(before / scale)), "rel_l2_after": float(np.sqrt(after / scale)),
            "kept": False, "factors_refit": 2}


def fit(student: onnx.ModelProto, layer: LinearLayer, constraints: Constraints, stats: list[Statistics],
        damping: float) -> dict:
    """Refit ``layer`` in ``student`` (mutated) from its statistics; returns the errors before / after."""
    with_bias = layer.bias is not None
    w_old = layer.weight.read(student)
    b_old = graph.get_array(student, layer.bias.name) if with_bias else None
    old_columns = layer.to_columns(w_old)
    old_bias = layer.bias_columns(b_old) if with_bias else [None] * len(stats)
    keeps = layer.to_columns(constraints.mask.astype(bool)) if constraints.mask is not None else [None] * len(stats)
    grids = None
    if layer.weight.grid is not None:
        scales = layer.to_columns(layer.weight.grid.scale)
        zeros = layer.to_columns(layer.weight.grid.zero_point)
        grids = [Grid(s, z, layer.weight.grid.qmin, layer.weight.grid.qmax, layer.weight.grid.sign)
                 for s, z in zip(scales, zeros)]
    before = sum(residual(st, w, b) for st, w, b in zip(stats, old_columns, old_bias))
    total = sum(st.target_sq for st in stats)

    new_columns: list[np.ndarray] = []
    new_bias: list[np.ndarray | None] = []
    integers: list[np.ndarray] = []
    stored_labels = layer.weight.labels
    centroids = None
    if stored_labels is not None or (constraints.codebook is not None and grids is None):
        if stored_labels is not None:
            codebook = graph.get_array(student, layer.weight.name).astype(np.float64).reshape(-1)
            label_columns = layer.to_columns(stored_labels)
        else:
            codebook = np.asarray(constraints.codebook, dtype=np.float64).reshape(-1)
            label_columns = [np.abs(np.asarray(w, dtype=np.float64)[..., None] - codebook).argmin(axis=-1)
                             for w in old_columns]
        labels = []
        for lab, keep in zip(label_columns, keeps):
            # a zero centroid is where an earlier prune left zeros: those weights stay out of the fit
            lab = np.where(codebook[lab] == 0.0, -1, lab)
            if keep is not None:
                lab = np.where(keep, lab, -1)
            labels.append(lab)
        centroids, biases = solve_codebook(stats, labels, codebook, damping, with_bias)
        for index, lab in enumerate(labels):
            new_columns.append(np.where(lab >= 0, centroids[np.maximum(lab, 0)], 0.0))
            new_bias.append(biases[index] if biases is not None else None)
        constraints.codebook = centroids.astype(np.float32)
    else:
        for g, st in enumerate(stats):
            lam = _ridge(st, damping)
            w, b = solve_float(st, lam, with_bias, keeps[g], old_columns[g])
            if grids is not None:
                q = round_on_grid(w, st, lam, grids[g], keeps[g])
                integers.append(q)
                w = grids[g].dequantize(q).astype(np.float64)
                if with_bias:
                    b = refit_bias(st, w)
            new_columns.append(w)
            new_bias.append(b)

    after = sum(residual(st, w, b) for st, w, b in zip(stats, new_columns, new_bias))
    if after > before:
        # ridge damping or rounding can lose to what is there on tiny data; never make a layer worse
        return {"rel_l2_before": float(np.sqrt(before / max(total, 1e-30))),
                "rel_l2_after": float(np.sqrt(before / max(total, 1e-30))), "kept": True}
    if grids is not None:
        layer.weight.write_integers(student, layer.from_columns(integers))
    elif stored_labels is not None:
        layer.weight.write_codebook(student, centroids)
    else:
        layer.weight.write_float(student, layer.from_columns(new_columns))
    if with_bias:
        old_dtype = np.asarray(b_old).dtype
        graph.set_array(student, layer.bias.name, layer.bias_from_columns(new_bias).astype(old_dtype))
    return {"rel_l2_before": float(np.sqrt(before / max(total, 1e-30))),
            "rel_l2_after": float(np.sqrt(after / max(total, 1e-30))), "kept": False}


class _Paired:
    """The first factor's input rows against the second factor's output rows (aligned: the second
    layer is pointwise over the first one's output)."""

    def __init__(self, first: LinearLayer, second: LinearLayer):
        self.first, self.second, self.node = first, second, second.node

    def design(self, x: np.ndarray) -> list[np.ndarray]:
        return self.first.design(x)

    def targets(self, y: np.ndarray) -> list[np.ndarray]:
        return self.second.targets(y)


def pointwise_pair(first: LinearLayer, second: LinearLayer) -> bool:
    """True when ``second`` multiplies each row of ``first``'s output by its weight and nothing else:
    then ``A U V`` is the pair and both factors can be refit from ``A``'s statistics."""
    if first.bias is not None or first.groups != 1 or second.groups != 1 or second.input != first.output:
        return False
    if first.kind in ("matmul", "gemm") and second.kind in ("matmul", "gemm"):
        return first.alpha == 1.0 and second.alpha == 1.0
    if first.kind == "conv" and second.kind == "conv":
        g = second.geometry
        return g.kernel == (1, 1) and g.strides == (1, 1) and not any(g.pads) and g.dilations == (1, 1) \
            and first.geometry.one_d == g.one_d
    return False


def run(student: onnx.ModelProto, teacher: onnx.ModelProto, fits: list[LayerFit], data: Dataset, *,
        damping: float, batch_size: int, progress: Callable[[float, str], None],
        check_cancelled: Callable[[], None], cost: CostMeter | None = None,
        budget_bytes: int = DEFAULT_BUDGET) -> list[dict]:
    """Refit ``fits`` in ``student``, in place; rows in the order of ``fits``.

    The calibration samples are carried through the student and the teacher once each, segment by
    segment (``worker.pipeline.sequential``): a layer is refit when the student's propagation
    reaches its input, so every layer upstream has been refit already (what the order of ``fits``
    promised), and only the segment's nodes run again - not the whole model per layer."""
    cost = cost if cost is not None else CostMeter()
    made_at = {name: index for index, node in enumerate(student.graph.node) for name in node.output}
    readers = [item.first if item.first is not None else item.layer for item in fits]
    order = sorted(range(len(fits)), key=lambda i: made_at.get(readers[i].input, -1))
    clock = LayerClock(len(fits), progress)
    rows: dict[int, dict] = {}
    # two propagations in lockstep share the budget: each holding all of it took MiniLM's refit with
    # 1024 samples to 1.30 GB, over the 2x float + 1 GiB bound (1.2 GB)
    share = budget_bytes // 2
    with Propagation(student, data, batch_size=batch_size, budget_bytes=share) as student_flow, \
            Propagation(teacher, data, batch_size=batch_size, budget_bytes=share) as teacher_flow:
        for done, index in enumerate(order):
            check_cancelled()
            item, reader = fits[index], readers[index]
            layer = item.layer
            clock.tick(done, item.key, "capture")

            def batches(item=item, reader=reader, layer=layer):
                pairs = lockstep(student_flow.stream([reader.input]), teacher_flow.stream([item.target]))
                while True:
                    with cost.phase("capture"):
                        pair = next(pairs, None)
                    if pair is None:
                        return
                    x, y = pair[0][reader.input], pair[1][item.target]
                    if item.target_channels is not None:
                        y = np.take(y, item.target_channels, axis=1 if layer.kind == "conv" else -1)
                    yield x, y

            if item.first is not None:
                paired = _Paired(item.first, layer)
                stats = _accumulate_timed(paired, batches(), cost)[0]
                clock.tick(done, item.key, "solve")
                with cost.phase("solve"), serial_lapack():
                    errors = fit_lowrank(student, item.first, layer, stats, damping)
            else:
                stats = _accumulate_timed(layer, batches(), cost, reference_fit(student, layer, item.constraints))
                clock.tick(done, item.key, "solve")
                with cost.phase("solve"), serial_lapack():
                    errors = fit(student, layer, item.constraints, stats, damping)
            rows[index] = {"name": item.key, "node": layer.node.name, "op": layer.node.op_type, **errors}
            progress((done + 1) / len(fits),
                     f"layer {done + 1}/{len(fits)} {item.key}: rel_l2 {errors['rel_l2_before']:.4f} -> "
                     f"{errors['rel_l2_after']:.4f}")
        restarts = teacher_flow.stats.restarts + student_flow.stats.restarts
    if restarts:
        for row in rows.values():
            row.setdefault("propagation_restarts", restarts)
    return [rows[i] for i in range(len(fits))]


def _accumulate_timed(layer, batches, cost: CostMeter, base=None) -> list[Statistics]:
    """``accumulate`` with its own arithmetic counted as ``statistics`` (the capture inside
    ``batches`` counts itself, and nested phases are taken out of the outer one)."""
    with cost.phase("statistics"):
        return accumulate(layer, batches, base)


def reference_fit(student: onnx.ModelProto, layer: LinearLayer, constraints: Constraints
                  ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per group, the layer's weights (columns, zero where the mask prunes) and bias as the student
    holds them before the refit: the reference the error statistics are taken from (``Statistics``)."""
    columns = layer.to_columns(layer.weight.read(student))
    if constraints.mask is not None:
        columns = [w * keep for w, keep in zip(columns, layer.to_columns(constraints.mask.astype(bool)))]
    if layer.bias is None:
        return [(w, None) for w in columns]
    return list(zip(columns, layer.bias_columns(graph.get_array(student, layer.bias.name))))
