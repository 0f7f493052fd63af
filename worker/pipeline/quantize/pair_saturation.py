"""Static int8's weight form per layer on an x86 CPU without VNNI, from the u8s8 kernel's pair
saturation measured on the calibration data.

ONNX Runtime's u8s8 GEMM on AVX2 without VNNI multiplies with ``vpmaddubsw``: the u8 x s8 products
of two neighbouring reduction elements are added into a saturating int16 before the int32 sum
(``int8_storage``). The neighbours are K = 2p and 2p + 1 of the GEMM it runs: a MatMul's or Gemm's
reduction axis; for a Conv, its patch in (kernel taps..., input channel) order, channels fastest,
one GEMM per group (tests/unit/pipeline/quantize/test_pair_saturation.py checks this model against
ONNX Runtime bit for bit on such a CPU). A pair can only overflow where both weights have the same
sign and |w1| + |w2| > 128 (255 * 128 = 32640 fits in int16), so only those pairs are computed, on
a sample of the rows the layer's real inputs make.

Left to ``int8_storage``, every such layer would store its weight as uint8 + 128 for the exact
u8u8 kernel, slower than u8s8 (AMD EPYC without VNNI: MiniLM at 0.84-1.01x FP32's latency that way,
0.74-0.75x with int8 everywhere). The fast kernel has two forms, each with its own error:
- the 8-bit grid stored int8: what the saturating pairs add, computed exactly on the sample;
- a 7-bit grid (s = absmax / 63), whose pairs cannot pass int16: exact, but its weight rounding
  error is about four times the 8-bit grid's.
Each layer takes the form that adds less, if what it adds is at most ``SLACK`` of the layer's own
error in the exact form (its input's rounding plus its 8-bit weights' rounding, estimated on the same
sample), else it keeps uint8 + 128. Measured on the PP-OCRv4 detector: a 7-bit grid wherever 8-bit
saturated at more than 1e-3 of the layer's output (14 of its 26 layers) cost IoU 0.9877 -> 0.9861 for
0.90x FP32's latency; this rule (20 layers int8 on the 8-bit grid, 6 kept uint8) 0.9872 at
0.95-1.00x, where uint8 + 128 everywhere ran at 1.01-1.05x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from worker.pipeline import activations, graph
from worker.pipeline.data import Dataset

SAMPLES = 16          # calibration samples whose layer inputs are read, at most
MIN_SAMPLES = 4       # ... and at least: a quarter of ROWS from each where one sample holds many rows
ROWS = 4096           # GEMM rows (tokens, output positions) per layer, drawn from those samples
SLACK = 0.25          # error energy a fast form may add, as a share of the layer's own in the exact form
SEVEN_BIT_STORAGE = "int8, 7-bit grid (|q| <= 63: its u8s8 pairs saturated at 8 bits)"
_INT16 = (-32768, 32767)
_ROW_CHUNK = 512


@dataclass
class Layer:
    """One integer layer as ONNX Runtime's GEMM sees it, and the errors measured on its inputs."""

    weight: str                 # the layer's weight name (the output of its DequantizeLinear)
    node: onnx.NodeProto
    stored: str                 # the uint8 + 128 initializer
    zero_point_name: str        # the weight's zero point initializer (128s)
    matrices: list[np.ndarray]  # per group, the [K, N] signed integers
    column_scales: list[np.ndarray]   # per group, [N] (the weight's per-column scale)
    input: str                  # the layer's input: the DequantizeLinear output of a uint8 tensor
    input_scale: float          # ... and that tensor's grid
    input_zero: int
    kernel: tuple[int, ...]     # a Conv's kernel shape, () for MatMul / Gemm
    per_tensor: bool            # one weight scale for the whole tensor
    # Error energies over the sampled rows (inputs in grid steps, weights in real units): what
    # saturation adds, summed exactly; and, from each input feature's mean square m_k, the weight
    # rounding's share on the 8-bit and the 7-bit grid (sum_k m_k |d_k|^2 over rows, d_k the
    # weight's rounding error in row k: rounding errors are independent of each other, so the
    # cross terms vanish in expectation) and the input rounding's (a uniform 1/12 step^2 per value)
    error: float = 0.0
    squares: list[np.ndarray] | None = None     # per group, sum over rows of (q - z)^2 per feature
    rows: int = 0
    # per group: [3, K] = per input feature k, |d_k|^2 on the 8-bit grid, on the 7-bit grid, and
    # |w_k|^2 / 12 (Sampler sets them from the float weights)
    weight_terms: list[np.ndarray] | None = None

    def energies(self) -> tuple[float, float, float]:
        """(8-bit weight rounding, 7-bit weight rounding, input rounding) error energies."""
        totals = np.zeros(3)
        for squares, terms in zip(self.squares or [], self.weight_terms or []):
            totals[:2] += terms[:2] @ squares
            totals[2] += terms[2].sum() * self.rows
        return float(totals[0]), float(totals[1]), float(totals[2])

    @property
    def saturation(self) -> float:
        """The error saturation adds with the 8-bit grid stored int8, as a share of the layer's own
        quantization error in the exact form (energies; 0 where nothing saturates)."""
        eight, _, inputs = self.energies()
        return self.error / (eight + inputs) if eight + inputs > 0 else 0.0

    def form(self) -> str:
        """``"int8"`` (8-bit grid, u8s8), ``"int8-7bit"`` or ``"uint8"`` (8-bit grid, exact u8u8): the
        fast form that adds the least output error, unless what it adds passes SLACK of the
        layer's own error in the exact form (input rounding plus 8-bit weight rounding)."""
        if not self.matrices or self.error == 0.0:
            return "int8"
        eight, seven, inputs = self.energies()
        added, form = min((self.error, "int8"), (max(seven - eight, 0.0), "int8-7bit"))
        return form if added <= SLACK * (eight + inputs) else "uint8"


def gemm_matrices(node: onnx.NodeProto, q: np.ndarray) -> list[np.ndarray] | None:
    """The weight's integers as the [K, N] matrices ONNX Runtime's GEMM reduces (one per Conv
    group; none for a depthwise Conv); None for a layout this module does not model (the layer keeps
    uint8 storage)."""
    if node.op_type == "MatMul":
        return [q] if q.ndim == 2 else None
    if node.op_type == "Gemm":
        if graph.attribute(node, "transA", 0) or q.ndim != 2:
            return None
        return [q.T if graph.attribute(node, "transB", 0) else q]
    if node.op_type == "Conv" and q.ndim >= 3:
        group = int(graph.attribute(node, "group", 1))
        if group > 1 and q.shape[1] == 1 and q.shape[0] == group:
            return []       # depthwise: ORT's own kernel sums in int32, no pairs saturate (measured)
        per_group = q.shape[0] // group
        taps_then_channels = (0, *range(2, q.ndim), 1)
        return [q[g * per_group:(g + 1) * per_group].transpose(taps_then_channels).reshape(per_group, -1).T
                for g in range(group)]
    return None


def _conv_geometry(node: onnx.NodeProto, spatial: int) -> tuple[list[int], list[int], list[int]] | None:
    if graph.attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None
    strides = list(graph.attribute(node, "strides", None) or [1] * spatial)
    dilations = list(graph.attribute(node, "dilations", None) or [1] * spatial)
    pads = list(graph.attribute(node, "pads", None) or [0] * (2 * spatial))
    return strides, dilations, pads


def gemm_rows(node: onnx.NodeProto, x: np.ndarray, kernel: tuple[int, ...], zero: float, count: int,
              rng: np.random.Generator) -> list[np.ndarray] | None:
    """Up to ``count`` rows of the GEMM's left operand (in ``x``'s dtype), drawn at random, one array
    per group: a MatMul's / Gemm's input rows, or a Conv's patches (padding reads ``zero``: ORT pads
    a uint8 input with its zero point, which is 0.0 in the dequantized input)."""
    if node.op_type in ("MatMul", "Gemm"):
        flat = x.reshape(-1, x.shape[-1])
        pick = rng.choice(flat.shape[0], size=min(count, flat.shape[0]), replace=False)
        return [flat[np.sort(pick)]]
    spatial = x.ndim - 2
    geometry = _conv_geometry(node, spatial)
    if geometry is None or len(kernel) != spatial:
        return None
    strides, dilations, pads = geometry
    sizes = [(x.shape[2 + d] + pads[d] + pads[spatial + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1
             for d in range(spatial)]
    if min(sizes) <= 0:
        return None
    total = x.shape[0] * int(np.prod(sizes))
    flat = np.sort(rng.choice(total, size=min(count, total), replace=False))
    sample, *outputs = np.unravel_index(flat, (x.shape[0], *sizes))
    padded = x if not any(pads) else np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[spatial + d])
                                                                    for d in range(spatial)], constant_values=zero)
    taps = []
    for tap in np.ndindex(*kernel):
        where = tuple(outputs[d] * strides[d] + tap[d] * dilations[d] for d in range(spatial))
        taps.append(padded[(sample, slice(None), *where)] if spatial else padded[sample])
    # advanced indices split by a slice put the indexed axis first: [rows, channels] per tap
    patches = np.stack(taps, axis=1)            # [rows, taps, channels]
    group = int(graph.attribute(node, "group", 1))
    per_group = x.shape[1] // group
    return [patches[:, :, g * per_group:(g + 1) * per_group].reshape(len(flat), -1) for g in range(group)]


def reachable_pairs(top: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pair p, column n) of the pairs K = 2p, 2p + 1 that can pass int16 with inputs up to ``top``
    (per K, uint8 values): both weights of one sign and top_2p |w_2p| + top_2p+1 |w_2p+1| > 32767
    (one MiniLM layer: ~1500 same-sign pairs over 128, ~60 that its rows reach). K even."""
    first, second = matrix[0::2].astype(np.int32), matrix[1::2].astype(np.int32)
    top = top.astype(np.int32)
    reach = top[0::2, None] * np.abs(first) + top[1::2, None] * np.abs(second)
    return np.nonzero((first * second > 0) & (reach > _INT16[1]))


def saturated_minus_exact(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[R, N] int64: what the pair-saturating kernel returns minus the exact product rows @ matrix
    (raw uint8 values; the zero point is subtracted after, through exact row / column sums)."""
    if matrix.shape[0] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
        matrix = np.pad(matrix, ((0, 1), (0, 0)))
    pair, column = reachable_pairs(rows.max(axis=0), matrix)
    difference = np.zeros((rows.shape[0], matrix.shape[1]), dtype=np.int64)
    if pair.size == 0:
        return difference
    w1, w2 = matrix[2 * pair, column].astype(np.int32), matrix[2 * pair + 1, column].astype(np.int32)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        chunk = rows[start:start + _ROW_CHUNK].astype(np.int32)
        products = chunk[:, 2 * pair] * w1 + chunk[:, 2 * pair + 1] * w2
        lost = np.clip(products, *_INT16) - products            # 0 where the pair fits: most entries
        row, which = np.nonzero(lost)
        np.add.at(difference, (start + row, column[which]), lost[row, which])
    return difference


def saturation_energy(x: np.ndarray, matrix: np.ndarray, column_scale: np.ndarray, step: float, zero: int) -> float:
    """sum over rows and columns of (column_scale * saturated_minus_exact)^2 for float rows ``x`` on
    the uint8 grid (step, zero), putting back on the grid only the K the reachable pairs use: the
    conversion of every value was most of the sampler's time on MiniLM's 104-token sentences."""
    if matrix.shape[0] % 2:
        x = np.pad(x, ((0, 0), (0, 1)), constant_values=-zero * step)      # pads read as uint8 0
        matrix = np.pad(matrix, ((0, 1), (0, 0)))
    top = np.clip(np.rint(x.max(axis=0) / np.float32(step)) + zero, 0, 255)
    pairs = np.unique(reachable_pairs(top, matrix)[0])
    if pairs.size == 0:
        return 0.0
    used = np.stack([2 * pairs, 2 * pairs + 1], axis=1).ravel()
    q = np.clip(np.rint(x[:, used] / np.float32(step)) + zero, 0, 255).astype(np.uint8)
    return float(((saturated_minus_exact(q, matrix[used]) * column_scale) ** 2).sum())


def layers_of(model: onnx.ModelProto, nodes: dict[str, str]) -> list[Layer]:
    """The integer layers (``{node name: weight name}``) whose weight is stored uint8 + 128 and whose
    input is a uint8 QuantizeLinear output, as ``Layer`` records."""
    producers = graph.producers(model)
    inits = graph.initializers(model)
    by_name = {node.name: node for node in model.graph.node}
    found = []
    for node_name, weight in nodes.items():
        node = by_name.get(node_name)
        weight_dq, input_dq = producers.get(weight), producers.get(node.input[0]) if node is not None else None
        if (node is None or weight_dq is None or input_dq is None or weight_dq.op_type != "DequantizeLinear"
                or input_dq.op_type != "DequantizeLinear" or len(weight_dq.input) < 3 or len(input_dq.input) < 3):
            continue
        stored, scale, zero = weight_dq.input[:3]
        if stored not in inits or inits[stored].data_type != onnx.TensorProto.UINT8 or input_dq.input[2] not in inits:
            continue
        if inits[input_dq.input[2]].data_type != onnx.TensorProto.UINT8 or zero not in inits:
            continue
        signed = graph.get_array(model, stored).astype(np.int16) - 128
        if not (graph.get_array(model, zero) == 128).all():
            continue
        matrices = gemm_matrices(node, signed)
        if matrices is None:
            continue
        columns = [m.shape[1] for m in matrices]
        scales = graph.get_array(model, scale).astype(np.float64).reshape(-1)
        per_group = np.split(np.broadcast_to(scales, (sum(columns),)), np.cumsum(columns)[:-1]) if columns else []
        input_scale = graph.get_array(model, input_dq.input[1]).reshape(-1)
        if input_scale.size != 1:
            continue
        found.append(Layer(weight, node, stored, zero, matrices, per_group, node.input[0], float(input_scale[0]),
                           int(graph.get_array(model, input_dq.input[2]).reshape(-1)[0]),
                           tuple(int(s) for s in signed.shape[2:]) if node.op_type == "Conv" else (),
                           scales.size == 1))
    return found


class Sampler:
    """Rows of each modelled layer's real input, gathered batch by batch from a pass of the quantized
    model over calibration data (``measure``'s own, or bias correction's, which it rides: one pass
    for both), and the errors they show (``Layer.form``).

    It reads at least MIN_SAMPLES samples and at most SAMPLES, a share of ROWS from each: a
    detector's one image holds thousands of output positions per layer and it is done after
    MIN_SAMPLES images, where an encoder's 42-token sentences take all SAMPLES."""

    def __init__(self, model: onnx.ModelProto, nodes: dict[str, str], float_weight: Callable[[str], np.ndarray],
                 on_finish: Callable[[list[Layer]], None], *, rows: int = ROWS, seed: int = 0) -> None:
        self.layers = layers_of(model, nodes)
        for layer in self.layers:
            layer.squares = [np.zeros(matrix.shape[0]) for matrix in layer.matrices]
        self.rows = rows
        self._float_weight = float_weight
        self.read = 0
        self.finished = False
        self._on_finish = on_finish
        self._modelled = [layer for layer in self.layers if layer.matrices]
        self._rng = np.random.default_rng(seed)

    @property
    def tensors(self) -> list[str]:
        return sorted({layer.input for layer in self._modelled})

    def done(self) -> bool:
        return self.read >= SAMPLES or (self.read >= MIN_SAMPLES and
                                        all(layer.rows >= self.rows for layer in self._modelled))

    def add(self, count: int, values: dict[str, np.ndarray]) -> None:
        """One batch of ``count`` samples: ``values`` holds at least ``tensors``."""
        if self.done():
            return
        self.read += count
        for layer in list(self._modelled):
            share = min(self.rows - layer.rows, self.rows // MIN_SAMPLES * count)
            if share <= 0:
                continue
            # rows drawn from the float input, padding with 0.0 (the zero point); the values are on
            # the uint8 grid they came from, q = rne(x / s) + z exactly
            groups = gemm_rows(layer.node, values[layer.input], layer.kernel, 0.0, share, self._rng)
            if groups is None:          # a geometry it does not model: the layer stays uint8 + 128
                self._modelled.remove(layer)
                self.layers.remove(layer)
                continue
            for index, (x, matrix, scale) in enumerate(zip(groups, layer.matrices, layer.column_scales)):
                # x = (q - z) * s exactly, so (q - z)^2 = (x / s)^2
                layer.squares[index] += np.einsum("rk,rk->k", x, x, dtype=np.float64) / layer.input_scale ** 2
                layer.error += saturation_energy(x, matrix, scale, layer.input_scale, layer.input_zero)
            layer.rows += groups[0].shape[0]

    def finish(self) -> None:
        """Hand ``on_finish`` the layers measured (a depthwise Conv among them, exact by construction);
        the others keep uint8 + 128."""
        self.finished = True
        measured = [layer for layer in self.layers if layer.rows or not layer.matrices]
        for layer in measured:
            if layer.error > 0:      # only a layer that saturates has a choice to weigh
                _weight_terms(layer, self._float_weight(layer.weight))
        self._on_finish(measured)


def _weight_terms(layer: Layer, weight: np.ndarray) -> None:
    """``layer.weight_terms`` from its float weight (see ``Layer``)."""
    weight = weight.astype(np.float32, copy=False)
    floats = gemm_matrices(layer.node, weight) or []
    seven = seven_bit_scale(weight, None) if layer.per_tensor else None
    layer.weight_terms = []
    for matrix, scale, real in zip(layer.matrices, layer.column_scales, floats):
        step = seven if seven is not None else seven_bit_scale(real, 1)
        eight = matrix * scale.astype(np.float32) - real
        on_seven = np.rint(real / step) * step - real
        squares = [np.einsum("kn,kn->k", error, error) for error in (eight, on_seven, real)]
        layer.weight_terms.append(np.stack(squares).astype(np.float64) / np.array([[1.0], [1.0], [12.0]]))


def measure(sampler: Sampler, model: onnx.ModelProto, data: Dataset) -> None:
    """``sampler``'s own pass of ``model`` (quantized, weights uint8 + 128) over the calibration data,
    then its ``finish``."""
    if sampler.tensors:
        total = min(SAMPLES, data.size)
        for count, values in activations.capture_counted(model, data, sampler.tensors, limit=total,
                                                         batch_size=MIN_SAMPLES):
            sampler.add(count, values)
            if sampler.done():
                break
    sampler.finish()


def store_signed(model: onnx.ModelProto, layer: Layer) -> None:
    """The layer's weight as int8 with zero point 0: the same grid, the u8s8 kernel's form."""
    graph.set_array(model, layer.stored, (graph.get_array(model, layer.stored).astype(np.int16) - 128).astype(np.int8))
    zero = graph.get_array(model, layer.zero_point_name)
    graph.set_array(model, layer.zero_point_name, np.zeros(zero.shape, dtype=np.int8))


def seven_bit_scale(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """The 7-bit symmetric grid's scale, s = absmax / 63, along ``axis`` (per output channel) or
    per tensor, float32."""
    if axis is None:
        absmax = np.float32(np.abs(weight).max())
    else:
        other = tuple(i for i in range(weight.ndim) if i != axis)
        absmax = np.abs(weight).max(axis=other).astype(np.float32)
    return np.where(absmax > 0, absmax / np.float32(63), np.float32(1)).astype(np.float32)


def store_seven_bit(model: onnx.ModelProto, layer: Layer, weight: np.ndarray,
                    axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight on a 7-bit symmetric grid (s = absmax / 63, |q| <= 63) stored int8: no pair
    can reach 255 * 126 = 32130, so the u8s8 kernel is exact. Returns (q, scale)."""
    scale = seven_bit_scale(weight, axis)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)])
    q = np.clip(np.rint(weight / shaped), -63, 63).astype(np.int8)
    graph.set_array(model, layer.stored, q)
    scale_name = next(node.input[1] for node in model.graph.node if node.op_type == "DequantizeLinear"
                      and node.output[0] == layer.weight)
    graph.set_array(model, scale_name, scale.reshape(graph.get_array(model, scale_name).shape))
    zero = graph.get_array(model, layer.zero_point_name)
    graph.set_array(model, layer.zero_point_name, np.zeros(zero.shape, dtype=np.int8))
    return q, scale
