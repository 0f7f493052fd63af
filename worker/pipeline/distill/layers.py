"""Linear layers as distillation sees them: where the free parameters of a MatMul / Gemm / Conv live
in the graph, what constraints an earlier step left on them, and the layer as a matrix product.

Every supported layer is, per group ``g`` of output channels, ``T_g = A_g @ W_g (+ 1 b_g^T)`` with
``A_g`` the layer's input unfolded into rows (``[rows, K_g]``: the input itself for MatMul / Gemm,
its receptive fields (im2col) for Conv) and ``W_g`` the weight as ``[K_g, N_g]`` columns. That is
the form the least-squares fit (``layerwise``) works in; ``to_columns`` / ``from_columns`` convert
between it and the initializer's own layout.

A weight is a float initializer, integers ``q`` behind ``DequantizeLinear(q, s, z)`` on a fixed
grid (``w = (q - z) * s`` with ``s`` / ``z`` per tensor, per axis or per block, ONNX semantics), the
packed unsigned integers of a ``MatMulNBits`` or the int8 ``B`` of a ``DynamicQuantizeMatMul``
(com.microsoft; the same kind of grid in another package), or a codebook gathered by constant labels
(the ``cluster`` step). Grids are expanded here to one scale and zero point per element (``Grid``).
A bias is refit where it is a float initializer; a constant bias of another form (static
quantization's int32 bias behind a DequantizeLinear) is held fixed and taken off the target. Re-quantizing on the same grid is
``q = clamp(round_half_to_even(w / s) + z, qmin, qmax)``; a 1-bit (sign) grid keeps ``q`` in {-1, +1}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from worker.pipeline import graph, sessions
from worker.pipeline.unfold import conv_weight_from_matrix, conv_weight_matrix, unfold2d

_INT_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
}
if hasattr(onnx.TensorProto, "INT2"):
    _INT_RANGES[onnx.TensorProto.INT2] = (-2, 1)
    _INT_RANGES[onnx.TensorProto.UINT2] = (0, 3)


@dataclass
class Grid:
    """A quantization grid with one scale and zero point per weight element (the weight's layout)."""

    scale: np.ndarray        # float32, the weight's shape
    zero_point: np.ndarray   # int64, the weight's shape
    qmin: int
    qmax: int
    sign: bool = False       # 1-bit sign quantization: q in {-1, +1}, w' = alpha * q

    def quantize(self, w: np.ndarray) -> np.ndarray:
        if self.sign:
            # sign(0) is +1, as the sign quantizer defines it
            return np.where(np.asarray(w) >= 0, 1, -1).astype(np.int64)
        # float32 division, as QuantizeLinear does it, so the integers match ONNX's own
        ratio = np.asarray(w, dtype=np.float32) / self.scale
        return np.clip(np.rint(ratio).astype(np.int64) + self.zero_point, self.qmin, self.qmax)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q, dtype=np.int64) - self.zero_point).astype(np.float32) * self.scale).astype(np.float32)


def _expand(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """DequantizeLinear's broadcasting of a scale / zero point to the full tensor shape."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1:
        return np.broadcast_to(param.reshape(()), shape).copy()
    axis = axis % len(shape)
    if block_size:
        expanded = np.repeat(param, block_size, axis=axis)
        return np.take(expanded, np.arange(shape[axis]), axis=axis).reshape(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(param.reshape(view), shape).copy()


@dataclass
class WeightSource:
    """Where a layer's weight is stored: a float initializer, an integer one behind a DequantizeLinear,
    or a codebook initializer gathered by constant labels (the ``cluster`` step's decoding chain)."""

    name: str                      # the initializer holding the stored values
    shape: tuple[int, ...]
    grid: Grid | None = None       # set when the stored values are integers on a grid
    labels: np.ndarray | None = None   # set for a codebook: weight = codebook[labels], the weight's shape
    nbits: dict | None = None      # set for MatMulNBits: K, N, bits, block_size of the packed B

    def read(self, model: onnx.ModelProto) -> np.ndarray:
        """The weight as the layer uses it (float32, dequantized where quantized)."""
        if self.nbits is not None:
            return self.grid.dequantize(_unpack_nbits(graph.get_array(model, self.name), self.nbits))
        stored = graph.get_array(model, self.name)
        if self.labels is not None:
            return np.asarray(stored, dtype=np.float32).reshape(-1)[self.labels]
        if self.grid is None:
            return np.asarray(stored, dtype=np.float32)
        return self.grid.dequantize(np.asarray(stored).astype(np.int64))

    def write_codebook(self, model: onnx.ModelProto, centroids: np.ndarray) -> None:
        old = graph.get_array(model, self.name)
        graph.set_array(model, self.name, np.asarray(centroids).reshape(old.shape).astype(old.dtype))

    def write_float(self, model: onnx.ModelProto, w: np.ndarray) -> None:
        """Store ``w``: as is for a float weight, re-quantized on the same grid otherwise."""
        if self.grid is None:
            old = graph.get_array(model, self.name)
            graph.set_array(model, self.name, np.asarray(w, dtype=old.dtype).reshape(self.shape))
        else:
            self.write_integers(model, self.grid.quantize(np.asarray(w).reshape(self.shape)))

    def write_integers(self, model: onnx.ModelProto, q: np.ndarray) -> None:
        if self.nbits is not None:
            graph.set_array(model, self.name, _pack_nbits(np.asarray(q).reshape(self.shape), self.nbits))
            return
        old = graph.get_array(model, self.name)
        # astype to the stored numpy dtype (int8, or ml_dtypes' int4 / int2) keeps the ONNX type
        graph.set_array(model, self.name, np.asarray(q, dtype=np.int64).reshape(self.shape).astype(old.dtype))


def _dequantize_source(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                       grid_bits: dict | None) -> WeightSource | None:
    """A DequantizeLinear whose integers, scale and zero point are all initializers."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    q_init = inits.get(node.input[0])
    s_init = inits.get(node.input[1])
    z_init = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q_init is None or s_init is None or (len(node.input) > 2 and node.input[2] and z_init is None):
        return None
    if q_init.data_type not in _INT_RANGES:
        return None
    shape = tuple(q_init.dims)
    axis = int(graph.attribute(node, "axis", 1)) if shape else 0
    block_size = int(graph.attribute(node, "block_size", 0) or 0)
    scale = numpy_helper.to_array(s_init).astype(np.float32)
    zero = numpy_helper.to_array(z_init).astype(np.int64) if z_init is not None else np.zeros((), np.int64)
    qmin, qmax = _INT_RANGES[q_init.data_type]
    sign = False
    if grid_bits:
        bits = grid_bits.get("bits")
        if bits == 1:
            sign = True
        elif isinstance(bits, int) and bits < 16:
            # a 4-bit grid stored in an 8-bit type keeps its 4-bit range
            signed = grid_bits.get("signed", qmin < 0)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            if signed and qmin >= 0:   # a signed grid stored unsigned, shifted to mid-range (int8_storage)
                lo, hi = lo + (qmax + 1) // 2, hi + (qmax + 1) // 2
            qmin, qmax = max(qmin, lo), min(qmax, hi)
    grid = Grid(_expand(scale, shape, axis, block_size).astype(np.float32),
                _expand(zero, shape, axis, block_size).astype(np.int64), qmin, qmax, sign)
    return WeightSource(q_init.name, shape, grid)


def constant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes computed from initializers alone (no graph input upstream), in topological order."""
    known = {t.name for t in model.graph.initializer} | {""}
    found = []
    for node in graph.topological_nodes(model):
        if all(name in known for name in node.input):
            found.append(node)
            known.update(node.output)
    return found


def constant_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Evaluate constant tensors (outputs of ``constant_nodes``) with ONNX Runtime: a graph of just
    the nodes that compute them, no inputs."""
    if not names:
        return {}
    constant = constant_nodes(model)
    producers = {out: node for node in constant for out in node.output}
    needed, stack, used_inits = [], list(names), set()
    seen: set[int] = set()
    inits = graph.initializers(model)
    while stack:
        name = stack.pop()
        if name in inits:
            used_inits.add(name)
            continue
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(i for i in node.input if i)
    order = [n for n in constant if id(n) in seen]
    sub = onnx.helper.make_graph(order, "constants", [], [onnx.helper.make_empty_tensor_value_info(n) for n in names],
                                 [inits[n] for n in sorted(used_inits)])
    sub_model = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    run = sessions.session(sub_model)
    return dict(zip(names, run.run(names, {})))


def _codebook_source(model: onnx.ModelProto, tensor: str, producer: onnx.NodeProto,
                     inits: dict[str, onnx.TensorProto]) -> WeightSource | None:
    """``Reshape(Gather(codebook, labels), shape)`` with every input constant: a shared-value weight."""
    producers = graph.producers(model)
    gather = producers.get(producer.input[0])
    if gather is None or gather.op_type != "Gather" or gather.input[0] not in inits:
        return None
    book = inits[gather.input[0]]
    if book.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(book.dims) != 1:
        return None
    if producer.input[1] not in {n for node in constant_nodes(model) for n in node.output} | set(inits):
        return None
    values = constant_values(model, [tensor, gather.input[1]])
    weight, labels = values[tensor], np.asarray(values[gather.input[1]], dtype=np.int64)
    if labels.size != weight.size or graph.attribute(gather, "axis", 0) != 0:
        return None
    return WeightSource(book.name, tuple(weight.shape), labels=labels.reshape(weight.shape))


def _unpack_nbits(packed: np.ndarray, meta: dict) -> np.ndarray:
    """MatMulNBits' B [N, blocks, blob] (W^T, low bits first) -> unsigned integers [K, N]."""
    import kernels

    n, k, bits = meta["N"], meta["K"], meta["bits"]
    per_row = packed.shape[1] * packed.shape[2] * 8 // bits
    rows = kernels.unpack(np.ascontiguousarray(packed.reshape(-1)), bits, signed=False, count=n * per_row)
    return rows.reshape(n, per_row)[:, :k].T.astype(np.int64)


def _pack_nbits(q: np.ndarray, meta: dict) -> np.ndarray:
    """The inverse of ``_unpack_nbits``; past K each row keeps its block's zero point (ORT's layout)."""
    import kernels

    k, n = q.shape
    bits, blocks, blob = meta["bits"], meta["blocks"], meta["blob"]
    rows = np.repeat(meta["zero_rows"], meta["block_size"], axis=1)[:, :blocks * meta["block_size"]].astype(np.uint8)
    rows[:, :k] = q.T.astype(np.uint8)
    return kernels.pack(rows.reshape(-1), bits).reshape(n, blocks, blob)


def _dynamic_source(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> WeightSource | None:
    """DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias): B int8 / uint8 [K, N], its scale and
    zero point per tensor or per column (axis 1); the activations are quantized at run time and are
    not part of the stored grid."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    q_init = inits[node.input[1]]
    if q_init.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(q_init.dims) != 2:
        return None
    z_name = node.input[3] if len(node.input) > 3 else ""
    if z_name and z_name not in inits:
        return None
    shape = tuple(q_init.dims)
    scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[z_name]).astype(np.int64) if z_name else np.zeros((), np.int64)
    qmin, qmax = _INT_RANGES[q_init.data_type]
    return WeightSource(q_init.name, shape, Grid(_expand(scale, shape, 1, 0).astype(np.float32),
                                                 _expand(zero, shape, 1, 0).astype(np.int64), qmin, qmax))


def _nbits_source(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> WeightSource | None:
    """MatMulNBits (com.microsoft) with a constant packed B, float scales and packed uint8 zero points."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    if any(name for name in node.input[4:5]):   # g_idx (act-order) is not a plain block grid
        return None
    k, n = int(graph.attribute(node, "K")), int(graph.attribute(node, "N"))
    bits, block_size = int(graph.attribute(node, "bits", 4)), int(graph.attribute(node, "block_size"))
    blocks = -(-k // block_size)
    packed = inits[node.input[1]]
    if tuple(packed.dims) != (n, blocks, block_size * bits // 8):
        return None
    scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks)
    zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.int64)
    if len(node.input) > 3 and node.input[3]:
        z_init = inits.get(node.input[3])
        if z_init is None or z_init.data_type != onnx.TensorProto.UINT8:
            return None
        import kernels

        raw = numpy_helper.to_array(z_init).reshape(-1)
        per_row = raw.size * 8 // bits // n
        zero = kernels.unpack(np.ascontiguousarray(raw), bits, signed=False, count=n * per_row).reshape(n, per_row)[:, :blocks]
        zero = zero.astype(np.int64)
    meta = {"K": k, "N": n, "bits": bits, "block_size": block_size, "blocks": blocks, "blob": block_size * bits // 8,
            "zero_rows": zero}
    expand = lambda a: np.repeat(a.T, block_size, axis=0)[:k]   # noqa: E731  [blocks, N] -> [K, N]
    grid = Grid(expand(scale).astype(np.float32), expand(zero).astype(np.int64), 0, (1 << bits) - 1)
    return WeightSource(packed.name, (k, n), grid, nbits=meta)


def weight_source(model: onnx.ModelProto, tensor: str, grid_bits: dict | None = None) -> WeightSource | None:
    """The storage of the weight tensor ``tensor`` that a layer reads, or None when it is not a constant."""
    inits = graph.initializers(model)
    if tensor in inits:
        init = inits[tensor]
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return None
        return WeightSource(tensor, tuple(init.dims))
    producer = graph.producers(model).get(tensor)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return _dequantize_source(model, producer, inits, grid_bits)
    if producer is not None and producer.op_type == "Reshape":
        return _codebook_source(model, tensor, producer, inits)
    return None


@dataclass
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]   # top, left, bottom, right
    dilations: tuple[int, int]
    group: int
    one_d: bool                       # a 1-D Conv, run as 2-D with a height of one


def conv_geometry(node: onnx.NodeProto, weight_shape: tuple[int, ...], input_hw: tuple[int, ...] | None) -> ConvGeometry | None:
    """Geometry of a 1-D or 2-D Conv, padding resolved (SAME_* needs the input's spatial size)."""
    if len(weight_shape) not in (3, 4):
        return None
    one_d = len(weight_shape) == 3
    kernel = tuple(weight_shape[2:])
    strides = tuple(graph.attribute(node, "strides", [1] * len(kernel)))
    dilations = tuple(graph.attribute(node, "dilations", [1] * len(kernel)))
    auto_pad = graph.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "NOTSET":
        pads = tuple(graph.attribute(node, "pads", [0] * (2 * len(kernel))))
    elif auto_pad == "VALID":
        pads = (0,) * (2 * len(kernel))
    else:
        if input_hw is None:
            return None
        begin, end = [], []
        for size, k, s, d in zip(input_hw, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begin + end)
    if one_d:
        kernel, strides, dilations = (1, kernel[0]), (1, strides[0]), (1, dilations[0])
        pads = (0, pads[0], 0, pads[1])
    return ConvGeometry(kernel, strides, pads, dilations, int(graph.attribute(node, "group", 1)), one_d)


@dataclass
class LinearLayer:
    """One MatMul / Gemm / Conv of a graph with constant weights, seen as ``T_g = A_g W_g + b_g``."""

    node: onnx.NodeProto
    kind: str                          # matmul | gemm | conv
    input: str                         # the activation the weight multiplies
    output: str                        # the layer's output, bias included
    weight: WeightSource
    bias: WeightSource | None = None   # a float bias, [N] or [1, N] (Gemm C, Conv B, MatMul + Add)
    bias_factor: float = 1.0           # Gemm's beta: the stored bias is b / beta
    alpha: float = 1.0                 # Gemm's alpha scales A
    trans_b: bool = False
    geometry: ConvGeometry | None = None
    fixed_bias: np.ndarray | None = None   # a constant bias that is not a float initializer (int32 behind a DQ): kept


    @property
    def groups(self) -> int:
        return self.geometry.group if self.geometry is not None else 1

    def to_columns(self, w: np.ndarray) -> list[np.ndarray]:
        """The weight (its own layout) as one ``[K_g, N_g]`` matrix per group."""
        if self.kind == "matmul":
            return [np.asarray(w)]
        if self.kind == "gemm":
            return [np.asarray(w).T if self.trans_b else np.asarray(w)]
        w4 = np.asarray(w)[:, :, None, :] if self.geometry.one_d else np.asarray(w)
        per_group = w4.shape[0] // self.groups
        return [conv_weight_matrix(w4[g * per_group:(g + 1) * per_group]).T for g in range(self.groups)]

    def from_columns(self, columns: list[np.ndarray]) -> np.ndarray:
        if self.kind == "matmul":
            return np.asarray(columns[0])
        if self.kind == "gemm":
            return np.asarray(columns[0]).T if self.trans_b else np.asarray(columns[0])
        shape4 = (self.weight.shape[0], self.weight.shape[1], 1, self.weight.shape[2]) if self.geometry.one_d \
            else self.weight.shape
        per_group = shape4[0] // self.groups
        blocks = [conv_weight_from_matrix(np.asarray(c).T, (per_group, *shape4[1:])) for c in columns]
        w4 = np.concatenate(blocks, axis=0)
        return w4[:, :, 0, :] if self.geometry.one_d else w4

    def design(self, x: np.ndarray) -> list[np.ndarray]:
        """The layer's input as rows ``A_g`` (``[rows, K_g]``), one per group; Gemm's alpha folded in."""
        x = np.asarray(x, dtype=np.float32)
        if self.kind == "matmul":
            return [x.reshape(-1, x.shape[-1])]
        if self.kind == "gemm":
            return [x * np.float32(self.alpha) if self.alpha != 1.0 else x]
        x4 = x[:, :, None, :] if self.geometry.one_d else x
        per_group = x4.shape[1] // self.groups
        geo = {"kernel": self.geometry.kernel, "strides": self.geometry.strides, "pads": self.geometry.pads,
               "dilations": self.geometry.dilations}
        return [unfold2d(np.ascontiguousarray(x4[:, g * per_group:(g + 1) * per_group]), geo) for g in range(self.groups)]

    def targets(self, y: np.ndarray) -> list[np.ndarray]:
        """The layer's output as rows ``T_g`` (``[rows, N_g]``) matching ``design``; a fixed bias is
        taken off, so the fit is of ``A W`` alone."""
        y = np.asarray(y, dtype=np.float32)
        if self.kind in ("matmul", "gemm"):
            rows = y.reshape(-1, y.shape[-1])
            return [rows - self.fixed_bias if self.fixed_bias is not None else rows]
        y4 = y[:, :, None, :] if self.geometry.one_d else y
        per_group = y4.shape[1] // self.groups
        rows = y4.transpose(0, 2, 3, 1).reshape(-1, y4.shape[1])
        if self.fixed_bias is not None:
            rows = rows - self.fixed_bias
        return [rows[:, g * per_group:(g + 1) * per_group] for g in range(self.groups)]

    def bias_columns(self, b: np.ndarray) -> list[np.ndarray]:
        flat = np.asarray(b, dtype=np.float64).reshape(-1) * self.bias_factor
        size = flat.size // self.groups
        return [flat[g * size:(g + 1) * size] for g in range(self.groups)]

    def bias_from_columns(self, columns: list[np.ndarray]) -> np.ndarray:
        return (np.concatenate(columns) / self.bias_factor).reshape(self.bias.shape)


def _bias_source(model: onnx.ModelProto, name: str, channels: int) -> WeightSource | None:
    init = graph.initializers(model).get(name)
    if init is None or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return None
    shape = tuple(init.dims)
    if int(np.prod(shape)) != channels or any(d != 1 for d in shape[:-1]):
        return None
    return WeightSource(name, shape)


def _matmul_layer(model: onnx.ModelProto, node: onnx.NodeProto, source: WeightSource) -> LinearLayer | None:
    uses = graph.consumers(model)
    out_name = node.output[0]
    layer = LinearLayer(node, "matmul", node.input[0], out_name, source)
    n = source.shape[1]
    if node.op_type == "MatMulNBits" and len(node.input) > 5 and node.input[5]:
        layer.bias = _bias_source(model, node.input[5], n)
        return layer if layer.bias is not None else None
    # a bias added right after the MatMul (exported Linear layers) is the layer's bias
    following = uses.get(out_name, [])
    outputs = {o.name for o in model.graph.output}
    if len(following) == 1 and following[0][0].op_type == "Add" and out_name not in outputs:
        add, index = following[0]
        bias = _bias_source(model, add.input[1 - index], n)
        if bias is not None and len(uses.get(bias.name, [])) == 1:
            layer.bias, layer.output = bias, add.output[0]
    return layer


def linear_layer(model: onnx.ModelProto, node: onnx.NodeProto, *, grid_bits: dict | None = None,
                 input_shapes: dict[str, tuple] | None = None) -> tuple[LinearLayer | None, str]:
    """``node`` as a LinearLayer, or (None, why not)."""
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        source = _nbits_source(model, node, graph.initializers(model))
        if source is None:
            return None, "MatMulNBits with act-order indices or float zero points is not refit"
        layer = _matmul_layer(model, node, source)
        if layer is None:
            return None, "MatMulNBits' bias is not a per-output constant this step can refit"
        return layer, ""
    if node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft":
        source = _dynamic_source(node, graph.initializers(model))
        if source is None:
            return None, "DynamicQuantizeMatMul whose weight, scale or zero point is not a constant"
        layer = LinearLayer(node, "matmul", node.input[0], node.output[0], source)
        if len(node.input) > 4 and node.input[4]:
            layer.bias = _bias_source(model, node.input[4], source.shape[1])
            if layer.bias is None:
                return None, "DynamicQuantizeMatMul's bias is not a per-output constant this step can refit"
        return layer, ""
    if node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
        return None, ("an embedding lookup has no input to adapt to: its best fit is the original rows, "
                      "which the earlier step's rounding already gives")
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None, f"{node.op_type} layers are not refit"
    if len(node.input) < 2:
        return None, "no weight input"
    source = weight_source(model, node.input[1], grid_bits)
    if source is None:
        return None, "the weight is not a constant (float initializer or DequantizeLinear of one)"
    uses = graph.consumers(model)
    if len(uses.get(source.name, [])) > 1 or len(uses.get(node.input[1], [])) > 1:
        return None, "the weight is shared by several nodes"
    out_name = node.output[0]
    if node.op_type == "MatMul":
        if len(source.shape) != 2:
            return None, "MatMul weight is not 2-D"
        return _matmul_layer(model, node, source), ""
    if node.op_type == "Gemm":
        if graph.attribute(node, "transA", 0):
            return None, "Gemm with transA is not refit"
        trans_b = bool(graph.attribute(node, "transB", 0))
        layer = LinearLayer(node, "gemm", node.input[0], out_name, source, trans_b=trans_b,
                            alpha=float(graph.attribute(node, "alpha", 1.0)))
        n = source.shape[0] if trans_b else source.shape[1]
        if len(node.input) > 2 and node.input[2]:
            beta = float(graph.attribute(node, "beta", 1.0))
            bias = _bias_source(model, node.input[2], n)
            if bias is not None and beta != 0.0 and len(uses.get(node.input[2], [])) == 1:
                layer.bias, layer.bias_factor = bias, beta
            else:
                fixed = _fixed_bias(model, node.input[2], n)
                if fixed is None:
                    return None, "Gemm's C is not a per-output bias this step can refit or hold fixed"
                layer.fixed_bias = fixed * np.float32(beta)
        return layer, ""
    spatial = None
    if input_shapes is not None and node.input[0] in input_shapes:
        spatial = tuple(input_shapes[node.input[0]][2:])
    geometry = conv_geometry(node, source.shape, spatial)
    if geometry is None:
        return None, "only 1-D and 2-D Conv layers are refit"
    layer = LinearLayer(node, "conv", node.input[0], out_name, source, geometry=geometry)
    if len(node.input) > 2 and node.input[2]:
        bias = _bias_source(model, node.input[2], source.shape[0])
        if bias is not None and len(uses.get(node.input[2], [])) == 1:
            layer.bias = bias
        else:
            layer.fixed_bias = _fixed_bias(model, node.input[2], source.shape[0])
            if layer.fixed_bias is None:
                return None, "Conv's bias is not a constant this step can refit or hold fixed"
    return layer, ""


def _fixed_bias(model: onnx.ModelProto, name: str, channels: int) -> np.ndarray | None:
    """A per-output bias computed from constants (static quantization's int32 bias behind a
    DequantizeLinear), as float32 [channels]; None when it is not one."""
    constant = {o for node in constant_nodes(model) for o in node.output}
    if name not in constant and name not in graph.initializers(model):
        return None
    value = np.asarray(constant_values(model, [name])[name] if name in constant else graph.get_array(model, name))
    if value.size != channels or any(d != 1 for d in value.shape[:-1]):
        return None
    return value.reshape(-1).astype(np.float32)
