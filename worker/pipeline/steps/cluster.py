"""The ``cluster`` step: k-means weight sharing, stored as a codebook and bit-packed indices.

Math: for each selected weight W (n elements) and k = 2**bits, 1-D k-means (``kernels.kmeans1d``,
Lloyd iterations from k-means++ or quantile seeds) finds centroids c_1 < ... < c_k minimising
``sum_i (w_i - c_{l(i)})^2``; W is replaced by ``c[l]``. Pruned weights (the ``LayerRecord`` mask
of an earlier prune, or exact zeros when they are at least 1% of the tensor) keep the value 0
exactly: the codebook is ``{0} + k-1`` centroids fitted to the remaining weights, so clustering
after pruning never revives a zero.

Storage, chosen so ONNX Runtime runs it with standard ops (opset 11) and the file shrinks by about
``32 / bits``: the labels are packed ``p = floor(32 / bits)`` to a uint32 word, label j of a word in
bits ``[bits j, bits (j + 1))``. At load, ONNX Runtime's constant folding evaluates once

    words[W, 1] --BitShift LEFT by (32 - bits (j + 1))_j--> [W, p] --BitShift RIGHT by (32 - bits)-->
    labels --Reshape [-1], Slice [:n], Cast int64--> Gather(codebook) --Reshape W.shape--> weight

whose output keeps the weight's original name, so its consumers are untouched and inference runs
on the float weight at the original speed. A k-means codebook is not uniform, which rules out
DequantizeLinear; 32-bit words serve every bit width from 1 to 8 (at 3, 5, 6, 7 bits 28-30 of
the 32 bits carry labels), where ONNX's UINT4 / INT2 types would need opset 21 / 25 and cover only
some widths. Tensors smaller than ``min_params`` (1024 by default) are left alone: there the
codebook and the seven nodes cost more than they save.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import kernels
from core.recipe import ClusterStep
from worker.pipeline import subgraphs
from worker.pipeline.graph import (WeightLayer, ensure_opset, get_array, layers_with_bodies, opset, read_as_data,
                                   remove_initializers, unique_name)
from worker.pipeline.quantize import lift_constants
from worker.pipeline.step import StepContext, StepResult, selects_no_weight
from worker.pipeline.records import StepLog, layer_record, sparsity_of

name = "cluster"
Params = ClusterStep

CLUSTER_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
MIN_OPSET = 11                  # BitShift
ZERO_SHARE = 0.01               # exact zeros this common are taken as pruned and kept at 0
KMEANS_ITERATIONS = 50


def pack_labels(labels: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [ceil(n / p), 1], p = 32 // bits labels each, label j at bit bits*j."""
    per_word = 32 // bits
    flat = labels.reshape(-1).astype(np.uint32)
    padded = np.zeros(-(-flat.size // per_word) * per_word, dtype=np.uint32)
    padded[:flat.size] = flat
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :]
    words = np.bitwise_or.reduce(padded.reshape(-1, per_word) << shifts, axis=1)
    return words.astype(np.uint32).reshape(-1, 1)


def cluster_weight(w: np.ndarray, bits: int, pruned: np.ndarray | None, init: str) -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32 [<= 2**bits] ascending, labels uint8 of w's shape)."""
    k = 1 << bits
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if pruned is None:
        count = min(k, int(np.unique(flat).size))
        centroids, labels = kernels.kmeans1d(flat, count, init=init, iters=KMEANS_ITERATIONS)
        return centroids, labels.reshape(w.shape)
    pruned = pruned.reshape(-1)
    live = flat[~pruned]
    count = min(k - 1, int(np.unique(live).size))
    labels = np.zeros(flat.size, dtype=np.uint8)
    if count == 0:
        return np.zeros(1, dtype=np.float32), labels.reshape(w.shape)
    centroids, live_labels = kernels.kmeans1d(live, count, init=init, iters=KMEANS_ITERATIONS)
    zero_at = int(np.searchsorted(centroids, 0.0, side="left"))
    codebook = np.concatenate([centroids[:zero_at], [0.0], centroids[zero_at:]]).astype(np.float32)
    # live centroid j sits at codebook index j below the inserted zero, j + 1 above it
    remap = np.arange(count) + (np.arange(count) >= zero_at)
    labels[~pruned] = remap[live_labels].astype(np.uint8)
    labels[pruned] = zero_at
    return codebook, labels.reshape(w.shape)


def _layers(model: onnx.ModelProto, params: ClusterStep) -> list[WeightLayer]:
    """The selected layers, those inside If / Loop / Scan bodies included (an EmbeddingBag's table
    stayed float32, unlisted). The decoded weight keeps its name in the main graph, where the bodies
    read it."""
    return layers_with_bodies(model, CLUSTER_OPS, include=params.include, exclude=params.exclude,
                              min_params=params.min_params)


def check(model: onnx.ModelProto, params: ClusterStep, ctx: StepContext) -> None:
    """Before any work: the selection matches at least one weight."""
    if not any(_layers(m, params) for m in lift_constants.as_checked(model)):
        raise selects_no_weight("cluster", CLUSTER_OPS, params, model)


def run(model: onnx.ModelProto, params: ClusterStep, ctx: StepContext) -> StepResult:
    lift_constants.lift_constant_weights(model)
    subgraphs.hoist_weights(model)
    layers = _layers(model, params)
    if not layers:
        raise selects_no_weight("cluster", CLUSTER_OPS, params, model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if opset(out) < MIN_OPSET:
        out = ensure_opset(out, MIN_OPSET)
    graph_inputs = {value.name for value in out.graph.input}
    log = StepLog()
    changed: list[str] = []
    per_word = 32 // params.bits
    shared: dict[str, str] = {}

    def constant(key: str, array: np.ndarray) -> str:
        # one copy of each small constant, shared by every clustered layer
        if key not in shared:
            shared[key] = unique_name(out, key)
            out.graph.initializer.append(numpy_helper.from_array(array, shared[key]))
        return shared[key]

    bytes_before = bytes_after = 0
    as_data = read_as_data(out, [layer.weight for layer in layers], CLUSTER_OPS)
    for done, layer in enumerate(layers):
        ctx.check_cancelled()
        ctx.progress(done / len(layers), f"cluster: {layer.weight}")
        if layer.weight in graph_inputs:
            log.skip(layer.weight, "initializer is also a graph input (can be overridden at run time)")
            continue
        if layer.weight in as_data:
            log.skip(layer.weight, f"also read as data by {as_data[layer.weight]}: clustering would change that "
                                   "result too")
            continue
        w = get_array(out, layer.weight)
        record = layer_record(ctx, layer)
        if record.mask is not None and record.mask.shape == w.shape:
            pruned = ~record.mask
        elif np.count_nonzero(w == 0) >= ZERO_SHARE * w.size:
            pruned = w == 0
        else:
            pruned = None
        codebook, labels = cluster_weight(w, params.bits, pruned, params.init)
        restored = codebook[labels.astype(np.int64)]
        words = pack_labels(labels, params.bits)

        base = layer.weight
        words_name = unique_name(out, f"{base}_cluster_words")
        book_name = unique_name(out, f"{base}_codebook")
        out.graph.initializer.append(numpy_helper.from_array(words, words_name))
        out.graph.initializer.append(numpy_helper.from_array(codebook.astype(w.dtype), book_name))
        left = constant(f"cluster_shift_left_{params.bits}bit",
                        (32 - params.bits * (np.arange(per_word, dtype=np.uint32) + 1)).astype(np.uint32))
        right = constant(f"cluster_shift_right_{params.bits}bit", np.array([32 - params.bits], dtype=np.uint32))
        flat_shape = constant("cluster_flat_shape", np.array([-1], dtype=np.int64))
        start = constant("cluster_slice_start", np.array([0], dtype=np.int64))
        stop = unique_name(out, f"{base}_cluster_count")
        out.graph.initializer.append(numpy_helper.from_array(np.array([w.size], dtype=np.int64), stop))
        shape = unique_name(out, f"{base}_cluster_shape")
        out.graph.initializer.append(numpy_helper.from_array(np.array(w.shape, dtype=np.int64), shape))

        names = [unique_name(out, f"{base}_cluster_{step}") for step in ("high", "labels", "flat", "head", "index", "values")]
        nodes = [
            helper.make_node("BitShift", [words_name, left], [names[0]], name=names[0], direction="LEFT"),
            helper.make_node("BitShift", [names[0], right], [names[1]], name=names[1], direction="RIGHT"),
            helper.make_node("Reshape", [names[1], flat_shape], [names[2]], name=names[2]),
            helper.make_node("Slice", [names[2], start, stop], [names[3]], name=names[3]),
            helper.make_node("Cast", [names[3]], [names[4]], name=names[4], to=TensorProto.INT64),
            helper.make_node("Gather", [book_name, names[4]], [names[5]], name=names[5], axis=0),
            helper.make_node("Reshape", [names[5], shape], [layer.weight], name=unique_name(out, f"{base}_cluster")),
        ]
        remove_initializers(out, [layer.weight])
        # the decoding nodes go first: every consumer of the weight comes after them
        for node in reversed(nodes):
            out.graph.node.insert(0, node)

        record.bits = params.bits
        record.codebook = codebook
        record.sparsity = sparsity_of(restored)
        record.extra["indices"] = words_name
        error = float(np.sum((w.astype(np.float64) - restored) ** 2))
        signal = float(np.sum(w.astype(np.float64) ** 2))
        sqnr = float(10 * np.log10(signal / error)) if error > 0 and signal > 0 else None
        record.extra["sqnr_db"] = sqnr
        record.extra["storage"] = f"codebook[{codebook.size}] + {params.bits}-bit indices in uint32 words"
        before = w.nbytes
        after = words.nbytes + codebook.size * w.dtype.itemsize
        bytes_before += before
        bytes_after += after
        changed.append(layer.weight)
        log.layers.append({"name": layer.weight, "node": layer.node, "op": layer.op, "params": int(w.size),
                           "bits": params.bits, "centroids": int(codebook.size), "sparsity": record.sparsity,
                           "sqnr_db": sqnr,
                           "bytes": int(before), "bytes_after": int(after)})
    del out.graph.value_info[:]
    return StepResult(out, changed, log.metrics(bits=params.bits, bytes_before=int(bytes_before),
                                                bytes_after=int(bytes_after)))
