"""MatMulNBits (com.microsoft): ONNX Runtime's fused weight-only MatMul, and the choice between it
and DequantizeLinear + MatMul.

Layout (ONNX Runtime contrib op, bits 2 / 4 / 8): for ``Y = A @ W`` with ``W[K, N]`` quantized in
blocks of ``block_size`` along K,
    B           uint8 [N, ceil(K / block_size), block_size * bits / 8]   W^T, packed, low bits first
    scales      float [N * ceil(K / block_size)]
    zero_points uint8 [N * ceil(ceil(K / block_size) * bits / 8)]       packed; omitted = 2^(bits-1)
The stored integers are unsigned: a symmetric (signed) grid is shifted by 2^(bits-1) and keeps the
default zero point, so ``(q_u - 2^(bits-1)) * s == q * s`` exactly: the same numbers as the
DequantizeLinear form, only packaged differently. Padding past K holds the zero point.
A per-channel or per-tensor grid is the blocked grid whose blocks all repeat the channel's (the
tensor's) scale and zero point (``from_grid``), so int8 / int4 / int2 per channel and sign (its
{-1, +1} in 2 bits) take MatMulNBits too.

``choose`` times both forms of one layer on the target's provider, interleaved, with the input
shape the layer sees on the calibration data (or generated inputs), and keeps the faster; layers of
one shape are timed once. Only one layer is ever built twice, so choosing costs no model copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

import kernels
from worker.pipeline import graph, metrics, sessions, subgraphs

DOMAIN = "com.microsoft"
SUPPORTED_BITS = (2, 4, 8)


@dataclass
class Packed:
    """A quantized MatMul weight in the DequantizeLinear layout (blocked along axis 0 of W[K, N])."""

    weight: str
    q: np.ndarray            # [K, N] unpacked integers (int8 signed / uint8 unsigned)
    scale: np.ndarray        # [ceil(K / block), N]
    zero_point: np.ndarray   # [ceil(K / block), N]
    bits: int
    signed: bool
    symmetric: bool
    block_size: int


def channel_block_size(k: int) -> int:
    """The block for a per-channel / per-tensor grid: the largest of 256..16 dividing K (no
    padding), else 32."""
    for size in (256, 128, 64, 32, 16):
        if k % size == 0:
            return size
    return 32


def from_grid(weight: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, bits: int, signed: bool,
              symmetric: bool, axis: int | None, block_size: int | None) -> Packed | None:
    """The MatMulNBits view of a MatMul weight W[K, N] quantized in DequantizeLinear layout: blocked
    along K as it is, or per channel (axis 1) / per tensor with the scale repeated in every block."""
    if q.ndim != 2 or bits not in SUPPORTED_BITS:
        return None
    k, n = q.shape
    if block_size is not None:
        if axis != 0:
            return None
        return Packed(weight, q, np.asarray(scale), np.asarray(zero_point), bits, signed, symmetric, block_size)
    if axis not in (None, 1):
        return None
    size = channel_block_size(k)
    blocks = -(-k // size)
    scale_b = np.broadcast_to(np.asarray(scale).reshape(1, -1) if axis == 1 else np.asarray(scale).reshape(1, 1),
                              (blocks, n)).copy()
    zero_b = np.broadcast_to(np.asarray(zero_point).reshape(1, -1) if axis == 1 else np.asarray(zero_point).reshape(1, 1),
                             (blocks, n)).copy()
    return Packed(weight, q, scale_b, zero_b, bits, signed, symmetric, size)


def eligible(model: onnx.ModelProto, packed: Packed) -> bool:
    """Every reader of the weight is a MatMul taking it as B, and the grid is blocked along K."""
    if packed.bits not in SUPPORTED_BITS or packed.q.ndim != 2:
        return False
    readers = graph.consumers(model).get(packed.weight, [])
    outputs = {o.name for o in model.graph.output}
    if packed.weight in subgraphs.subgraph_reads(model):     # an If / Loop body reads the dequantized weight
        return False
    return bool(readers) and packed.weight not in outputs and all(
        node.op_type == "MatMul" and index == 1 for node, index in readers)


def _pack_rows(values: np.ndarray, bits: int, row_length: int) -> np.ndarray:
    """Pack each row of ``values`` (unsigned) after padding it to ``row_length`` elements."""
    rows = values.shape[0]
    padded = np.zeros((rows, row_length), dtype=np.uint8)
    padded[:, :values.shape[1]] = values
    return kernels.pack(padded.reshape(-1), bits).reshape(rows, -1)


def to_matmulnbits(model: onnx.ModelProto, packed: Packed, float_type: int) -> list[str]:
    """Replace DequantizeLinear(weight) + MatMul(A, weight) by MatMulNBits(A, B, scales[, zp]),
    keeping each MatMul's name and output. Returns the names of the new nodes."""
    k, n = packed.q.shape
    blocks = -(-k // packed.block_size)
    offset = 1 << (packed.bits - 1)
    unsigned = packed.q.astype(np.int16) + offset if packed.signed else packed.q.astype(np.int16)
    default_zero = offset if packed.signed else 0
    # W^T rows, padded with the zero point past K
    rows = np.full((n, blocks * packed.block_size), default_zero, dtype=np.uint8)
    rows[:, :k] = unsigned.T.astype(np.uint8)
    if not packed.symmetric:
        zero = packed.zero_point.T.astype(np.uint8)                   # [N, blocks]
        pad = np.repeat(zero, packed.block_size, axis=1)[:, k:]
        rows[:, k:] = pad
    blob = packed.block_size * packed.bits // 8
    b_values = kernels.pack(rows.reshape(-1), packed.bits).reshape(n, blocks, blob)
    scale_dtype = np.float16 if float_type == onnx.TensorProto.FLOAT16 else np.float32
    b_name = graph.unique_name(model, f"{packed.weight}_nbits")
    s_name = graph.unique_name(model, f"{packed.weight}_nbits_scale")
    initializers = [numpy_helper.from_array(b_values, b_name),
                    numpy_helper.from_array(packed.scale.T.reshape(-1).astype(scale_dtype), s_name)]
    inputs = ["", b_name, s_name]
    if not packed.symmetric:
        z_name = graph.unique_name(model, f"{packed.weight}_nbits_zero_point")
        per_row = -(-blocks * packed.bits // 8) * 8 // packed.bits
        zero_rows = _pack_rows(packed.zero_point.T.astype(np.uint8), packed.bits, per_row)
        initializers.append(numpy_helper.from_array(zero_rows.reshape(-1), z_name))
        inputs.append(z_name)
    producer = graph.producers(model)[packed.weight]
    readers = [node for node, _ in graph.consumers(model)[packed.weight]]
    new_nodes = []
    for reader in readers:
        inputs[0] = reader.input[0]
        fused = helper.make_node("MatMulNBits", list(inputs), list(reader.output), name=reader.name, domain=DOMAIN,
                                 K=k, N=n, bits=packed.bits, block_size=packed.block_size)
        index = list(model.graph.node).index(reader)
        model.graph.node.remove(reader)
        model.graph.node.insert(index, fused)
        new_nodes.append(fused.name)
    dropped = [name for name in producer.input if name]
    model.graph.node.remove(producer)
    still_read = {name for node in model.graph.node for name in node.input} | subgraphs.subgraph_reads(model)
    graph.remove_initializers(model, [name for name in dropped if name not in still_read])
    model.graph.initializer.extend(initializers)
    graph.ensure_domain(model, DOMAIN, 1)
    return new_nodes


def layer_models(model: onnx.ModelProto, packed: Packed, float_type: int,
                 lead: tuple[int, ...]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """One MatMul of ``A[*lead, K]`` with this weight, as it stands in ``model`` (its
    DequantizeLinear, copied) and as MatMulNBits: the pair ``choose`` times. The DequantizeLinear
    side is timed in the form ``finalize`` may fold it into (``dequantize_form``: ONNX Runtime expands
    the weight once at load), so the choice is between MatMulNBits and a float MatMul."""
    producer = graph.producers(model)[packed.weight]
    inits = graph.initializers(model)
    k, n = packed.q.shape
    nodes = [producer, helper.make_node("MatMul", ["A", packed.weight], ["Y"], name="layer")]
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("A", float_type, [*lead, k])],
                          [helper.make_tensor_value_info("Y", float_type, [*lead, n])],
                          [inits[name] for name in producer.input if name])
    qdq = helper.make_model(g, opset_imports=list(model.opset_import))
    qdq.ir_version = model.ir_version
    fused = onnx.ModelProto()
    fused.CopyFrom(qdq)
    to_matmulnbits(fused, packed, float_type)
    from worker.pipeline.quantize import dequantize_form

    dequantize_form.fold(qdq, dequantize_form.weight_only_dequantizers(qdq))
    return qdq, fused


def choose(qdq_model: onnx.ModelProto, nbits_model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str,
           *, runs: int = 20, budget_s: float = 1.0) -> tuple[str, dict[str, float]]:
    """Time both models interleaved on ``feeds``; ("qdq" | "matmulnbits", p50 ms of each)."""
    pair = [sessions.session_from_proto(model, ".", provider) for model in (qdq_model, nbits_model)]
    qdq, nbits = metrics.latency(pair, feeds, runs=runs, budget_s=budget_s)
    timing = {"qdq": qdq["p50"], "matmulnbits": nbits["p50"]}
    return ("matmulnbits" if nbits["p50"] < qdq["p50"] else "qdq"), timing
