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
- low rank ``U V``: ``V``'s layer is refit on the student's ``U`` outputs (refit V given U); the rank
  cannot change because the factor shapes do not.

Layers go in the student's topological order, and each layer's inputs are captured from the
student *after* the layers before it were refit, so the fit also corrects the drift they pass on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from worker.pipeline import activations, graph
from worker.pipeline.data import Dataset
from worker.pipeline.distill.layers import Grid, LinearLayer


@dataclass
class Constraints:
    """What must hold for a layer's weight after the fit (weight layout, not columns)."""

    mask: np.ndarray | None = None       # True where a weight may be non-zero
    codebook: np.ndarray | None = None   # centroid values; each weight keeps its centroid


@dataclass
class Statistics:
    """Sufficient statistics of one group: enough to fit and to measure the fit."""

    hessian: np.ndarray        # H = A^T A   [K, K]
    cross: np.ndarray          # C = A^T T   [K, N]
    input_sum: np.ndarray      # s = A^T 1   [K]
    target_sum: np.ndarray     # t = T^T 1   [N]
    target_sq: float           # ||T||^2
    rows: int


def accumulate(layer: LinearLayer, batches: Sequence[tuple[np.ndarray, np.ndarray]] | object) -> list[Statistics]:
    """Sum the statistics over ``(student input, teacher output)`` batches, float64."""
    stats: list[Statistics] | None = None
    for x, y in batches:
        designs, targets = layer.design(x), layer.targets(y)
        if stats is None:
            stats = [Statistics(np.zeros((a.shape[1], a.shape[1])), np.zeros((a.shape[1], t.shape[1])),
                                np.zeros(a.shape[1]), np.zeros(t.shape[1]), 0.0, 0)
                     for a, t in zip(designs, targets)]
        for st, a, t in zip(stats, designs, targets):
            if a.shape[0] != t.shape[0]:
                raise ValueError(f"layer {layer.node.name}: {a.shape[0]} input rows but {t.shape[0]} output rows")
            a64, t64 = a.astype(np.float64), t.astype(np.float64)
            st.hessian += a64.T @ a64
            st.cross += a64.T @ t64
            st.input_sum += a64.sum(axis=0)
            st.target_sum += t64.sum(axis=0)
            st.target_sq += float(np.square(t64).sum())
            st.rows += a.shape[0]
    if stats is None:
        raise ValueError("no calibration batches")
    return stats


def residual(st: Statistics, w: np.ndarray, b: np.ndarray | None) -> float:
    """||A W + 1 b^T - T||^2 from the statistics alone (no second pass over the data)."""
    w = np.asarray(w, dtype=np.float64)
    value = float(np.sum(w * (st.hessian @ w))) - 2.0 * float(np.sum(w * st.cross)) + st.target_sq
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        value += 2.0 * float(b @ (w.T @ st.input_sum)) - 2.0 * float(b @ st.target_sum) + st.rows * float(b @ b)
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
        solution = _solve(system, rhs)
    else:
        solution = np.zeros((system.shape[0], n))
        patterns, inverse = np.unique(keep.T, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        for index, pattern in enumerate(patterns):
            columns = np.flatnonzero(inverse == index)
            rows = np.flatnonzero(pattern)
            if with_bias:
                rows = np.append(rows, k)
            if rows.size == 0:
                continue
            solution[np.ix_(rows, columns)] = _solve(system[np.ix_(rows, rows)], rhs[np.ix_(rows, columns)])
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


def run(student: onnx.ModelProto, teacher: onnx.ModelProto, fits: list[LayerFit], data: Dataset, *,
        damping: float, batch_size: int, progress: Callable[[float, str], None],
        check_cancelled: Callable[[], None]) -> list[dict]:
    """Refit ``fits`` (already in the student's topological order) in ``student``, in place."""
    inputs = {spec.name for spec in data.specs}
    teacher_run = activations.session(activations.with_outputs(teacher, sorted({f.target for f in fits})))
    rows = []
    for index, item in enumerate(fits):
        check_cancelled()
        layer = item.layer
        student_run = None if layer.input in inputs else \
            activations.session(activations.with_outputs(student, [layer.input]))

        def batches():
            for feeds in data.batches(batch_size):
                x = feeds[layer.input] if student_run is None else student_run.run([layer.input], feeds)[0]
                y = teacher_run.run([item.target], feeds)[0]
                yield x, y

        stats = accumulate(layer, batches())
        errors = fit(student, layer, item.constraints, stats, damping)
        rows.append({"name": item.key, "node": layer.node.name, "op": layer.node.op_type, **errors})
        progress((index + 1) / len(fits),
                 f"layer {index + 1}/{len(fits)} {item.key}: rel_l2 {errors['rel_l2_before']:.4f} -> "
                 f"{errors['rel_l2_after']:.4f}")
    return rows
