"""SmoothQuant: move activation outliers of MatMul / Gemm inputs into their weights before static
int8, exactly in float.

For a layer ``y = X W`` (``W[K, N]``; Gemm with transB: ``W[N, K]``) and a per-input-channel
factor ``s[K] > 0``:

    y = (X diag(1/s)) (diag(s) W)

so the outputs are unchanged up to float rounding. Transformer activations have a few channels
hundreds of times larger than the rest; one uint8 grid for the whole tensor spends its levels on
them. Dividing those channels by ``s`` and multiplying the matching weight rows by ``s`` flattens
the activation; per-channel int8 weights absorb the growth easily. The factor (Xiao et al., 2023):

    s_k = max|X_k| ** alpha / max|W_k| ** (1 - alpha)

with ``max|X_k|`` over the calibration data and ``max|W_k|`` over the k-th input row of every
weight that reads ``X`` (layers reading the same tensor share one ``s``: the Q, K and V projections
of an attention block). ``alpha`` 0 leaves the activations alone, 1 moves everything into the weights.

Which inputs: a normalization's output (LayerNormalization, or a decomposed one), where the
outliers are; see ``_normalized`` for the measurement that left the others alone.

Where ``1/s`` goes: folded into the producer of ``X`` when the group is ``X``'s only reader and the
producer is a LayerNormalization, or a ``Mul`` by a constant per-channel vector followed by an
``Add`` of one (a decomposed LayerNorm's gamma and beta), so it costs nothing at run time;
otherwise a ``Mul(X, 1/s)`` is inserted in front of the group's layers (one elementwise product,
where the residual stream still reads the unscaled ``X``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from worker.pipeline import calibrate, graph
from worker.pipeline.data import Dataset

# calibration samples read to find the per-channel activation maxima (static int8: the first
# batches of its calibration pass, until at least this many; ``prepare``). An outlier channel of a
# transformer is one in every token, so a few thousand tokens find it: on all-MiniLM-L6-v2 (64
# sentences of real text) 32 samples gave the task metric 128 did (0.9986 / 0.9985, rel_l2 0.048 /
# 0.049), and at 128 sentences of 104 tokens the maxima pass was 2.0 of static int8's 10.7 s.
SAMPLES = 32
FACTOR_RANGE = (1e-4, 1e4)    # keeps s finite where a channel or a weight row is (almost) zero


@dataclass
class Group:
    """Layers that read one activation ``tensor`` (its last axis the input channels ``K``)."""

    tensor: str
    nodes: list[onnx.NodeProto]
    weights: list[str]


def weight_rows_axis(node: onnx.NodeProto) -> int | None:
    """The weight axis indexed by the input channel, or None where the node is no plain layer."""
    if node.op_type == "MatMul":
        return 0
    if node.op_type == "Gemm" and not graph.attribute(node, "transA", 0):
        return 1 if graph.attribute(node, "transB", 0) else 0
    return None


def groups(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[Group]:
    """The selected layers grouped by their activation input; a weight shared with another group (or
    read by anything else) cannot take two factors, so its group is dropped."""
    inits = graph.initializers(model)
    readers = graph.consumers(model)
    found: dict[str, Group] = {}
    for node in nodes:
        axis = weight_rows_axis(node)
        if axis is None or len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) != 2 or len(readers.get(node.input[1], [])) != 1:
            continue
        group = found.setdefault(node.input[0], Group(node.input[0], [], []))
        group.nodes.append(node)
        group.weights.append(node.input[1])
    kept = []
    for group in found.values():
        sizes = {inits[w].dims[weight_rows_axis(n)] for n, w in zip(group.nodes, group.weights)}
        if len(sizes) == 1 and _normalized(model, group.tensor, sizes.pop(), readers):
            kept.append(group)
    return kept


def _normalized(model: onnx.ModelProto, tensor: str, size: int, readers: dict) -> bool:
    """Whether ``tensor`` is a normalization's output (LayerNormalization, or a decomposed one's
    ``Add(Mul(u, gamma), beta)``): where per-channel outliers live (the norm's gamma makes them).
    Only these inputs are smoothed: on a 6-layer BERT, smoothing the GELU output and the attention
    context too (a Mul in front of the output projections) lowered the task metric (0.978 -> 0.890
    at alpha 0.5), the weights of those layers taking more error than their inputs lost."""
    producer = graph.producers(model).get(tensor)
    if producer is None:
        return False
    if producer.op_type == "LayerNormalization":
        return True
    if producer.op_type != "Add":
        return False
    producers = graph.producers(model)
    inits = graph.initializers(model)
    for index in (0, 1):
        mul = producers.get(producer.input[index])
        beta = inits.get(producer.input[1 - index])
        if mul is not None and mul.op_type == "Mul" and beta is not None and int(np.prod(beta.dims)) == size:
            return any(name in inits and int(np.prod(inits[name].dims)) == size for name in mul.input)
    return False


def factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|X| ** alpha / max|W| ** (1 - alpha), 1 where either is zero, clipped to FACTOR_RANGE."""
    x_max = x_max.astype(np.float64)
    w_max = w_max.astype(np.float64)
    s = np.ones_like(x_max)
    live = (x_max > 0) & (w_max > 0)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1.0 - alpha)
    return np.clip(s, *FACTOR_RANGE)


@dataclass
class Pending:
    """A group whose ``X -> X / s`` is in the graph with ``s = 1`` until ``resolve`` sets it:
    ``tensor`` is what its layers now read (``X`` itself where ``1/s`` folds into the producer, else
    the inserted Mul's output, ``factor`` its ``1/s`` initializer)."""

    group: Group
    tensor: str
    factor: str | None
    folded: list[str]             # the producer's gamma / beta that take 1/s (empty: a Mul)
    done: bool = False


def prepare(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[Pending]:
    """The groups of ``nodes``, each with its division by ``s`` in place at ``s = 1`` (exact: the
    model computes what it did), so that static int8 plans and calibrates the final graph in one
    pass and sets ``s`` once the pass has seen SAMPLES samples (``calibrate.DeferredScales``)."""
    pending = []
    inits = graph.initializers(model)
    for group in groups(model, nodes):
        axis = weight_rows_axis(group.nodes[0])
        ones = np.ones(inits[group.weights[0]].dims[axis], np.float32)
        folded = _fold_into_producer(model, group, ones)
        if folded is not None:
            pending.append(Pending(group, group.tensor, None, folded))
        else:
            pending.append(Pending(group, *_insert_divide(model, group, ones), []))
    if pending:
        graph.sort_graph(model)
    return pending


def resolve(model: onnx.ModelProto, pending: list[Pending], maxima: dict[str, np.ndarray],
            alpha: float) -> dict[str, np.ndarray]:
    """Set each pending group's ``s`` from ``maxima`` (max |X| per channel of the tensors the groups
    read, unsmoothed); returns ``{tensor: 1 / s}``, what those tensors' values are now multiplied by."""
    inverses = {}
    for item in pending:
        group, x_max = item.group, maxima.get(item.tensor)
        rows = [(graph.get_array(model, w).astype(np.float64), weight_rows_axis(n))
                for n, w in zip(group.nodes, group.weights)]
        if x_max is None or x_max.shape[0] != rows[0][0].shape[rows[0][1]]:
            continue
        w_max = np.max([np.abs(w).max(axis=1 - axis) for w, axis in rows], axis=0)
        s = factors(x_max, w_max, alpha)
        for (weight, axis), name in zip(rows, group.weights):
            shape = (-1, 1) if axis == 0 else (1, -1)
            graph.set_array(model, name, (weight * s.reshape(shape)).astype(np.float32))
        inverse = (1.0 / s).astype(np.float32)
        if item.factor is not None:
            graph.set_array(model, item.factor, inverse)
        else:                      # the graph may be re-sorted since: the vectors by name
            _scale_vectors(model, item.folded, inverse)
        inverses[item.tensor] = inverse
        item.done = True
    return inverses


def smooth(model: onnx.ModelProto, data: Dataset, nodes: list[onnx.NodeProto], alpha: float) -> list[str]:
    """Apply SmoothQuant in place to the groups of ``nodes``, the maxima from a pass of their own over
    the first SAMPLES samples (static int8 takes them from its calibration pass instead); returns the
    smoothed tensors' names."""
    pending = prepare(model, nodes)
    if not pending:
        return []
    deferred = calibrate.DeferredScales([item.tensor for item in pending], SAMPLES,
                                        lambda maxima: resolve(model, pending, maxima, alpha))
    calibrate.collect(model, data, [], batch_size=16, limit=min(data.size, SAMPLES), deferred=deferred)
    return [item.group.tensor for item in pending if item.done]


def divide_input(model: onnx.ModelProto, group: Group, inverse: np.ndarray) -> None:
    """X -> X / s for the group's layers: folded into the producer where exact, else a Mul."""
    if _fold_into_producer(model, group, inverse) is None:
        _insert_divide(model, group, inverse)


def _insert_divide(model: onnx.ModelProto, group: Group, inverse: np.ndarray) -> tuple[str, str]:
    """A ``Mul(X, 1/s)`` in front of the group's layers; returns (its output, its factor's name)."""
    scaled = graph.unique_name(model, f"{group.tensor}_smoothed")
    factor = graph.unique_name(model, f"{group.tensor}_smooth_factor")
    graph.set_array(model, factor, inverse)
    for node in group.nodes:
        node.input[0] = scaled
    model.graph.node.append(helper.make_node("Mul", [group.tensor, factor], [scaled],
                                             name=graph.unique_name(model, f"{group.tensor}_smooth")))
    return scaled, factor


def _own_vector(model: onnx.ModelProto, name: str, size: int, readers: dict) -> np.ndarray | None:
    """A 1-D (or broadcast [.., K]) float initializer of ``size`` channels read by one node only."""
    inits = graph.initializers(model)
    if name not in inits or len(readers.get(name, [])) != 1:
        return None
    value = numpy_helper.to_array(inits[name])
    if value.size != size or value.shape[-1] != size or value.dtype != np.float32:
        return None
    return value


def _fold_into_producer(model: onnx.ModelProto, group: Group, inverse: np.ndarray) -> list[str] | None:
    """Multiply the producer's per-channel gamma / beta by ``inverse`` where the group's layers are
    ``X``'s only readers; returns those vectors' names, None where it cannot fold."""
    readers = graph.consumers(model)
    outputs = {o.name for o in model.graph.output}
    if group.tensor in outputs or {id(n) for n, _ in readers.get(group.tensor, [])} != {id(n) for n in group.nodes}:
        return None
    producer = graph.producers(model).get(group.tensor)
    if producer is None:
        return None
    size = inverse.shape[0]
    if producer.op_type == "LayerNormalization" and graph.attribute(producer, "axis", -1) == -1:
        vectors = [name for name in producer.input[1:3] if name]
        values = [_own_vector(model, name, size, readers) for name in vectors]
        if any(value is None for value in values):
            return None
        _scale_vectors(model, vectors, inverse)
        return vectors
    if producer.op_type == "Add":
        chain = _mul_add_chain(model, producer, size, readers)
        if chain is None:
            return None
        _scale_vectors(model, [name for name, _ in chain], inverse)
        return [name for name, _ in chain]
    return None


def _scale_vectors(model: onnx.ModelProto, names: list[str], inverse: np.ndarray) -> None:
    for name in names:
        value = graph.get_array(model, name)
        graph.set_array(model, name, (value * inverse.reshape(value.shape[-1:])).astype(np.float32))


def _mul_add_chain(model: onnx.ModelProto, add: onnx.NodeProto, size: int, readers: dict):
    """(gamma, beta) of ``Add(Mul(u, gamma), beta)`` with both per-channel constants owned by the
    chain and the Mul read only by the Add; None otherwise."""
    producers = graph.producers(model)
    inits = graph.initializers(model)
    for index in (0, 1):
        beta_name, t = add.input[1 - index], add.input[index]
        mul = producers.get(t)
        if beta_name not in inits or mul is None or mul.op_type != "Mul" or len(readers.get(t, [])) != 1:
            continue
        gamma_name = next((name for name in mul.input if name in inits), None)
        if gamma_name is None:
            continue
        beta = _own_vector(model, beta_name, size, readers)
        gamma = _own_vector(model, gamma_name, size, readers)
        if beta is not None and gamma is not None:
            return [(gamma_name, gamma), (beta_name, beta)]
    return None
