"""The ``lowrank`` step: replace a weight by a product of two thin factors (truncated SVD).

MatMul / Gemm, W[K, N] (x @ W): ``W ~ U_r S_r V_r^T = A B`` with ``A = U_r sqrt(S_r)`` [K, r] and
``B = sqrt(S_r) V_r^T`` [r, N] (the singular values split evenly, so both factors have the same
scale, which later quantization prefers). ``x @ W`` becomes ``(x @ A) @ B``: two MatMuls; a Gemm
keeps its bias, alpha and beta on the second (``Gemm(MatMul(x, A), B, C)``); ``transB`` weights are
transposed first. By the Eckart–Young theorem this is the best rank-r approximation in the
Frobenius norm: ``||W - A B||_F^2 = sum_{i>r} s_i^2``.

Rank: ``rank_ratio`` keeps that fraction of the layer's parameters, ``r = floor(ratio K N / (K + N))``;
``energy`` keeps the smallest r with ``sum_{i<=r} s_i^2 >= energy * sum s_i^2``. A layer where
``r (K + N) >= K N`` (no parameters saved) is left alone and reported.

Conv W[O, I, kh, kw] (group 1):
* ``channel``: ``W_mat[O, I kh kw] ~ A B``; a kh x kw Conv with r outputs and the original strides,
  pads and dilations (weight ``B`` reshaped to [r, I, kh, kw]), then a 1 x 1 Conv [O, r, 1, 1]
  (weight ``A``) with the bias. Parameters ``r (I kh kw + O)``.
* ``spatial``: ``M[(i, y), (o, x)] = W[o, i, y, x] ~ A B``; a kh x 1 Conv [r, I, kh, 1] (vertical
  stride, pads and dilation) then a 1 x kw Conv [O, r, 1, kw] (horizontal ones) with the bias.
  Both convolutions are linear and zero padding factorises over the two axes, so the pair equals a
  kh x kw Conv with weight ``sum_r A[(i, y), r] B[r, (o, x)]``. Parameters ``r (I kh + O kw)``.

With calibration data the factors minimise the layer's *output* error on it rather than the weight
error (``truncated_svd``: the SVD of ``L^T W`` with ``H = L L^T`` the input Hessian), for MatMul,
Gemm and channel-mode Conv; spatial Conv factorization stays weight-space.

SVD: ``numpy.linalg.svd`` (LAPACK), or for large matrices with a small rank the randomized range
finder of Halko, Martinsson & Tropp (2011): ``Y = (W W^T)^q W Omega`` for a Gaussian ``Omega`` with
r + max(10, r / 10) columns, 2 power iterations re-orthonormalised by QR, then the exact SVD of ``Q^T W``
(measured on 1100 x 1000 matrices, flat or decaying spectra, ranks 100-490: the error is within
0.3-2.7 % of the optimal one).

Each factorized weight's ``LayerRecord`` gets ``rank`` and ``factors`` (the two new initializers);
a pruning mask on it no longer applies and is dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.recipe import LowrankStep
from worker.pipeline.graph import WeightLayer, attribute, get_array, remove_initializers, sort_graph, unique_name, weight_layers
from worker.pipeline.quantize import lift_constants
from worker.pipeline.step import StepContext, StepResult, selects_no_weight
from worker.pipeline.data import bind
from worker.pipeline.hessians import capture_hessians, damped
from worker.pipeline.records import StepLog, layer_record
from worker.pipeline.unfold import conv2d_geometry

name = "lowrank"
Params = LowrankStep

RANDOMIZED_MIN_SIZE = 1 << 20          # matrices with at least this many elements ...
RANDOMIZED_MAX_RANK_FRACTION = 0.5     # ... and a rank below this fraction of min(K, N)
# (a full LAPACK SVD of 2048 x 2048 takes ~30 s on two cores, the randomized one ~2 s)
OVERSAMPLING = 10
POWER_ITERATIONS = 2


def _orthonormalize(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of y's columns: CholeskyQR2 (two rounds of ``Y R^-1`` with
    ``R^T R = Y^T Y``), a few times faster than Householder QR for tall, thin Y; Householder
    where the Gram matrix is too ill-conditioned to factor."""
    q = y
    for _ in range(2):
        try:
            upper = np.linalg.cholesky(q.T @ q).T
        except np.linalg.LinAlgError:
            return np.linalg.qr(y)[0]
        q = np.linalg.solve(upper.T, q.T).T
    return q


def randomized_svd(matrix: np.ndarray, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of ``matrix`` (Halko et al. 2011, algorithm 4.4)."""
    rng = np.random.default_rng(seed)
    m, n = matrix.shape
    width = min(rank + max(OVERSAMPLING, rank // 10), min(m, n))
    q = _orthonormalize(matrix @ rng.standard_normal((n, width)))
    for _ in range(POWER_ITERATIONS):
        # re-orthonormalise between products so small singular directions survive in float precision
        z = _orthonormalize(matrix.T @ q)
        q = _orthonormalize(matrix @ z)
    u_small, s, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vt[:rank]


def _randomized_pays(size: int, rank: int, smaller_dim: int) -> bool:
    return size >= RANDOMIZED_MIN_SIZE and rank < RANDOMIZED_MAX_RANK_FRACTION * smaller_dim


def truncated_svd(matrix: np.ndarray, params: LowrankStep,
                  hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(A, B, singular values kept, energy kept) for the rank the params ask of ``matrix`` [K, N].

    With the input Hessian ``H = L L^T`` of the layer (x @ W), the factorization minimises the
    output error ``||X (W - A B)||_F^2 = ||L^T (W - A B)||_F^2`` instead of the weight error: the SVD
    is taken of ``L^T W = U S V^T`` and ``A = L^-T U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``. The rank
    ``energy`` asks for is read off W's own spectrum either way: off ``L^T W``'s a transformer's
    outlier features put 95 % of an FFN output's energy in one direction and the rank fell to 1
    (all-MiniLM-L6-v2: output rel_l2 1.07 with calibration data, 0.55 without). The energy kept is
    W's, ``1 - ||W - A B||^2 / ||W||^2``, measured (the factors are not W's SVD with a Hessian)."""
    k, n = matrix.shape
    weight64 = matrix.astype(np.float64)
    work = weight64
    lower = None
    if hessian is not None:
        lower = np.linalg.cholesky(damped(hessian))
        work = lower.T @ work
    if params.rank_ratio is not None:
        rank = max(1, int(np.floor(params.rank_ratio * k * n / (k + n))))
        rank = min(rank, min(k, n))
        if _randomized_pays(matrix.size, rank, min(k, n)):
            u, s, vt = randomized_svd(work, rank)
            total = float(np.sum(work * work))
        else:
            u, s, vt = np.linalg.svd(work, full_matrices=False)
            total = float(np.sum(s * s))
    else:
        # the singular values alone cost a fraction of the full SVD; the vectors are then computed
        # for the chosen rank only (randomized where that pays)
        spectrum = np.linalg.svd(weight64, compute_uv=False)
        cumulative = np.cumsum(spectrum * spectrum)
        rank = int(np.searchsorted(cumulative, params.energy * cumulative[-1] * (1 - 1e-12)) + 1) \
            if cumulative[-1] > 0 else 1
        rank = min(rank, spectrum.size)
        if _randomized_pays(matrix.size, rank, min(k, n)):
            u, s, vt = randomized_svd(work, rank)
        else:
            u, s, vt = np.linalg.svd(work, full_matrices=False)
        total = float(np.sum(work * work))
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    root = np.sqrt(s)
    a = u * root[None, :]
    b = root[:, None] * vt
    if lower is None:
        kept = float(np.sum(s * s) / total) if total > 0 else 1.0          # Eckart-Young
    else:
        a = np.linalg.solve(lower.T, a)
        weight_energy = float(np.sum(weight64 * weight64))
        kept = 1.0 - float(np.sum((weight64 - a @ b) ** 2)) / weight_energy if weight_energy > 0 else 1.0
    return a.astype(np.float32), b.astype(np.float32), s, kept


def _conv_geometry(node: onnx.NodeProto, shape: tuple[int, ...]) -> dict | None:
    if len(shape) != 4 or attribute(node, "group", 1) != 1:
        return None
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    return {"strides": list(attribute(node, "strides", [1, 1])),
            "pads": list(attribute(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0],
            "dilations": list(attribute(node, "dilations", [1, 1]))}


def _ops(params: LowrankStep) -> tuple[str, ...]:
    return ("MatMul", "Gemm") + (("Conv",) if params.conv != "none" else ())


def _selected(model: onnx.ModelProto, params: LowrankStep) -> list[WeightLayer]:
    return weight_layers(model, ops=_ops(params), include=params.include, exclude=params.exclude, min_params=params.min_params)


def check(model: onnx.ModelProto, params: LowrankStep, ctx: StepContext) -> None:
    """Before any work: the selection matches at least one weight."""
    if not any(_selected(m, params) for m in lift_constants.as_checked(model)):
        raise selects_no_weight("lowrank", _ops(params), params, model)


def run(model: onnx.ModelProto, params: LowrankStep, ctx: StepContext) -> StepResult:
    lift_constants.lift_constant_weights(model)
    layers = _selected(model, params)
    if not layers:
        raise selects_no_weight("lowrank", _ops(params), params, model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {node.name: node for node in out.graph.node}
    readers: dict[str, int] = {}
    for node in out.graph.node:
        for input_name in node.input:
            readers[input_name] = readers.get(input_name, 0) + 1
    hessians = _hessians(out, layers, nodes, params, ctx) if ctx.calibration else {}
    log = StepLog()
    changed: list[str] = []
    before = after = 0
    for done, layer in enumerate(layers):
        ctx.check_cancelled()
        ctx.progress(done / len(layers), f"lowrank: {layer.weight}")
        node = nodes[layer.node]
        if readers.get(layer.weight, 0) > 1:
            log.skip(layer.weight, "weight shared by several layers")
            continue
        if layer.op == "Conv":
            outcome = _factorize_conv(out, node, layer, params, hessians.get(layer.weight))
        else:
            outcome = _factorize_linear(out, node, layer, params, hessians.get(layer.weight))
        if isinstance(outcome, str):
            log.skip(layer.weight, outcome)
            continue
        rank, factors, kept_energy, new_params = outcome
        record = layer_record(ctx, layer)
        record.rank, record.factors, record.mask, record.sparsity = rank, factors, None, 0.0
        # ||W - AB||^2 / ||W||^2 is the energy left out
        record.extra["sqnr_db"] = float(-10 * np.log10(1 - kept_energy)) if kept_energy < 1 else None
        changed.append(layer.weight)
        before += layer.params
        after += new_params
        log.layers.append({"name": layer.weight, "node": layer.node, "op": layer.op, "rank": rank,
                           "params": int(layer.params), "params_after": int(new_params),
                           "energy": kept_energy, "factors": list(factors)})
    remove_initializers(out, changed)
    sort_graph(out)
    del out.graph.value_info[:]
    return StepResult(out, changed, log.metrics(params_before=int(before), params_after=int(after),
                                                param_ratio=after / before if before else 1.0))


def _hessians(model: onnx.ModelProto, layers: list[WeightLayer], nodes: dict[str, onnx.NodeProto],
              params: LowrankStep, ctx: StepContext) -> dict[str, np.ndarray]:
    """Input Hessians of the layers a data-aware factorization can use (MatMul, Gemm without
    transA, channel-mode 2-D Conv), in one pass over the calibration data."""
    plans: dict[str, list[tuple[str, int, dict | None]]] = {}
    for layer in layers:
        node = nodes[layer.node]
        if layer.op == "Conv":
            geometry = conv2d_geometry(node, layer.shape) if params.conv == "channel" else None
            if geometry is None:
                continue
            plans.setdefault(node.input[0], []).append((layer.weight, int(np.prod(layer.shape[1:])), geometry))
        elif not (layer.op == "Gemm" and attribute(node, "transA", 0)):
            plans.setdefault(node.input[0], []).append((layer.weight, layer.shape[layer.in_axis], None))
    return capture_hessians(model, bind(model, ctx.calibration), plans) if plans else {}


def _rank_saves(params: LowrankStep, full: int, per_rank: int, max_rank: int) -> bool:
    """Whether the rank_ratio budget saves parameters at all (energy is judged after the SVD)."""
    if params.rank_ratio is None:
        return True
    rank = max(1, int(np.floor(params.rank_ratio * full / per_rank)))
    return min(rank, max_rank) * per_rank < full


def _factorize_linear(model: onnx.ModelProto, node: onnx.NodeProto, layer: WeightLayer, params: LowrankStep,
                      hessian: np.ndarray | None) -> tuple[int, tuple[str, str], float, int] | str:
    stored = get_array(model, layer.weight)
    w = stored.astype(np.float32)
    trans_b = layer.op == "Gemm" and attribute(node, "transB", 0)
    matrix = w.T if trans_b else w                       # [K, N] as in x @ W
    k, n = matrix.shape
    if layer.op == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA=1"
    if not _rank_saves(params, k * n, k + n, min(k, n)):
        return f"rank_ratio {params.rank_ratio} saves no parameters on [{k}, {n}]"
    a, b, s, kept = truncated_svd(matrix, params, hessian)
    rank = s.size
    if rank * (k + n) >= k * n:
        return f"rank {rank} for energy {params.energy} saves no parameters on [{k}, {n}]"
    a_name = unique_name(model, f"{layer.weight}_lowrank_a")
    model.graph.initializer.append(numpy_helper.from_array(a.astype(stored.dtype), a_name))
    b_name = unique_name(model, f"{layer.weight}_lowrank_b")
    model.graph.initializer.append(numpy_helper.from_array(b.astype(stored.dtype), b_name))
    middle = unique_name(model, f"{node.name}_lowrank")
    first = helper.make_node("MatMul", [node.input[0], a_name], [middle], name=unique_name(model, f"{node.name}_lowrank_a"))
    node.input[0], node.input[1] = middle, b_name
    if layer.op == "Gemm":
        for attr in node.attribute:
            if attr.name == "transB":
                attr.i = 0
    model.graph.node.append(first)
    return rank, (a_name, b_name), kept, rank * (k + n)


def _factorize_conv(model: onnx.ModelProto, node: onnx.NodeProto, layer: WeightLayer, params: LowrankStep,
                    hessian: np.ndarray | None) -> tuple[int, tuple[str, str], float, int] | str:
    geometry = _conv_geometry(node, layer.shape)
    if geometry is None:
        return "Conv that is not 2-D, grouped, or uses auto_pad SAME"
    stored = get_array(model, layer.weight)
    w = stored.astype(np.float32)
    o, i, kh, kw = w.shape
    if params.conv == "spatial":
        if kh == 1 or kw == 1:
            return "spatial factorization needs a kernel larger than 1 on both axes"
        matrix = w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)          # M[(i, y), (o, x)]
        per_rank = i * kh + o * kw
    else:
        matrix = w.reshape(o, i * kh * kw).T                              # x-side first: [I kh kw, O]
        per_rank = i * kh * kw + o
    if not _rank_saves(params, w.size, per_rank, min(matrix.shape)):
        return f"rank_ratio {params.rank_ratio} saves no parameters on {list(w.shape)}"
    if hessian is not None and params.conv == "channel":
        # the Hessian comes in unfold order (dy, dx, c); the matrix rows are W's (c, dy, dx)
        order = np.arange(kh * kw * i).reshape(kh, kw, i).transpose(2, 0, 1).reshape(-1)
        hessian = hessian[np.ix_(order, order)]
    else:
        hessian = None          # spatial: the first factor sees (c, dy) only; weight-space SVD
    a, b, s, kept = truncated_svd(matrix, params, hessian)
    rank = s.size
    if rank * per_rank >= w.size:
        return f"rank {rank} for energy {params.energy} saves no parameters on {list(w.shape)}"
    strides, pads, dilations = geometry["strides"], geometry["pads"], geometry["dilations"]
    if params.conv == "spatial":
        first_w = a.reshape(i, kh, rank).transpose(2, 0, 1)[:, :, :, None]   # [r, I, kh, 1]
        second_w = b.reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]  # [O, r, 1, kw]
        first_attrs = {"strides": [strides[0], 1], "pads": [pads[0], 0, pads[2], 0], "dilations": [dilations[0], 1]}
        second_attrs = {"strides": [1, strides[1]], "pads": [0, pads[1], 0, pads[3]], "dilations": [1, dilations[1]]}
    else:
        first_w = a.T.reshape(rank, i, kh, kw)                                # [r, I, kh, kw]
        second_w = b.T[:, :, None, None]                                      # [O, r, 1, 1]
        first_attrs = {"strides": strides, "pads": pads, "dilations": dilations}
        second_attrs = {}
    first_name = unique_name(model, f"{layer.weight}_lowrank_a")
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(first_w).astype(stored.dtype), first_name))
    second_name = unique_name(model, f"{layer.weight}_lowrank_b")
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(second_w).astype(stored.dtype), second_name))
    middle = unique_name(model, f"{node.name}_lowrank")
    first = helper.make_node("Conv", [node.input[0], first_name], [middle],
                             name=unique_name(model, f"{node.name}_lowrank_a"), **first_attrs)
    keep = [attr for attr in node.attribute if attr.name not in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")]
    del node.attribute[:]
    node.attribute.extend(keep)
    for key, value in second_attrs.items():
        node.attribute.append(helper.make_attribute(key, value))
    node.input[0], node.input[1] = middle, second_name
    model.graph.node.append(first)
    return rank, (first_name, second_name), kept, rank * per_rank
