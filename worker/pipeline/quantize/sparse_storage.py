"""Sparse storage of integer weights: a bitmask of the positions that hold something other than
the tensor's most common value (the zero a prune step left, or the zero point), and those values
in order. ONNX Runtime's constant folding decodes it once, at session load, with standard ops, into
the dense tensor under its original name: its readers (DequantizeLinear, DynamicQuantizeMatMul,
MatMulNBits, an embedding's Gather) are untouched and inference runs on the same dense weight.

``finalize`` applies it to the final model of a recipe that quantizes, after the last step: a later
step (``distill`` after ``quantize``) reads the quantized weights as initializers, so the storage
form is the file's business, not a step's.

Why: pruning zeroes half the weights, but a dense int8 tensor spends a byte on each zero, and zstd
(level 3) codes the zeros' positions worse than their entropy (short zero runs become matches).
Stored apart, the positions cost about ``H(p)`` bits per weight (p the share of non-fill values)
and the values about their order-0 entropy, which zstd's literal coding reaches. The file itself
shrinks to about ``1/8 + p`` of the dense tensor's bytes.

Format, for a tensor of n elements, fill value f and k other values v_1..v_k (row-major order):

    mask    uint8 [ceil(n / 8), 1]  bit j of byte i (least significant first) = 1 where element
                                    8 i + j differs from f
    values  int8 / uint8 [k + 1]    (f, v_1, ..., v_k)

Decoding (opset 11: BitShift, CumSum), evaluated once by constant folding:

    mask --BitShift LEFT by (7 - j)_j--> [m, 8] --BitShift RIGHT by 7--> bits --Reshape [-1],
    Slice [:n]--> flags --Cast int32 (int64 past 2**31 elements)--> CumSum --Mul flags--> index
    (the rank among the non-fill values, 0 at a fill position) --Gather(values)--> Reshape(shape)

Closing the gap (tensors whose fill is their symmetric grid's zero: 0 for int8, 128 for the uint8
storage of ``int8_storage``; i.e. pruned symmetric weights): magnitude pruning leaves no value
between -t and t (around that zero) in a channel, where t, the channel's smallest kept magnitude,
differs from channel to channel with the channel's scale (20 to 75 on the digits CNN's Gemm). The
values are stored as v = q - sign(q) (t - 1), so that every channel's values start at +-1 and one
zstd Huffman table fits all channels: on that Gemm order-0 entropy falls from 7.44 to 6.92 bits a
value. ``close_gap`` picks the axis that gains most (none where less than ``MIN_GAIN`` bytes); where
none does and the whole tensor has one gap (a per-tensor grid), ``shift_whole`` closes it with one
offset. The offsets t - 1 are stored int8, shaped to broadcast along that axis (or [1] * ndim), and
decoded after the Reshape:

    v --Cast int32--> w [--Sub(128), uint8 only] --Sign--> --Mul(Cast int32(offsets))--> --Add(w)-->
      --Cast(dtype)--> q

A weight is stored this way only where that makes the file's zstd bytes (level 3, as
``metrics.zstd_bytes`` measures them) smaller by at least ``MIN_GAIN``, measured here
(``store_sparse``: alone, then on the whole file), and the file's own bytes no larger (the size ratio
M counts them); otherwise it stays dense. (Without the second rule a dense weight whose sparse form saved one zstd byte grew the
file by 12 %.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.pipeline import graph
from worker.pipeline.quantize import file_layout
from worker.pipeline.quantize.file_layout import zstd_size
from worker.pipeline.quantize.sparse_form import GAP_CENTER, find_sparse_weights

MIN_OPSET = 11                      # BitShift, CumSum
MIN_ELEMENTS = 256                  # below this the nine decoding nodes cost more than any saving
PACKABLE = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
INT32_INDEX_LIMIT = 2 ** 31 - 1     # CumSum in int32 below this (half the memory of int64 at load)
MIN_GAIN = 64                       # zstd bytes a sparse form must save: less is noise, and costs nine nodes
COUNT_CHUNK = 1 << 16               # elements per bincount in value_counts (fits the cache)
WHOLE_FILE_WORK = 64 << 20          # bytes zstd may go through judging every candidate on the whole file


@dataclass
class Packed:
    """One tensor in sparse form: ``mask`` (uint8 [ceil(n/8), 1]), ``values`` (fill first)."""

    mask: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]
    offsets: np.ndarray | None = None     # t - 1 per slice along one axis (broadcast shape), or None

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + self.values.nbytes + (0 if self.offsets is None else self.offsets.nbytes)


# ---------------------------------------------------------------------------- numbers


def value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_counts=True)``; for 8- and 16-bit integers by counting (one pass)
    rather than sorting: the sort was 2 of the 20 CPU seconds of static int8 on a BERT."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind not in "iu" or flat.dtype.itemsize > 2 or flat.size == 0:
        return np.unique(flat, return_counts=True)
    if flat.dtype.itemsize == 1:
        # the bytes themselves, a cache-sized slice at a time: bincount widens its input to int64,
        # and on a whole tensor that copy, not the counting, was the time (4x, 0.1 s on a BERT)
        counts = np.zeros(256, dtype=np.int64)
        raw = flat.view(np.uint8)
        for start in range(0, raw.size, COUNT_CHUNK):
            counts += np.bincount(raw[start:start + COUNT_CHUNK], minlength=256)
        if flat.dtype == np.int8:        # byte b holds the value b - 256 from 128 on
            counts = np.roll(counts, -128)
            present = np.flatnonzero(counts)
            return (present - 128).astype(np.int8), counts[present]
        present = np.flatnonzero(counts)
        return present.astype(np.uint8), counts[present]
    low = int(flat.min())
    counts = np.bincount(flat.astype(np.int32) - low)
    present = np.flatnonzero(counts)
    return (present + low).astype(flat.dtype), counts[present]


def fill_value(q: np.ndarray) -> int:
    """The tensor's most common value (ties: the one nearest zero, then the smaller)."""
    return fill_and_count(q)[0]


def fill_and_count(q: np.ndarray) -> tuple[int, int]:
    """``fill_value`` and how many elements hold it."""
    values, counts = value_counts(q)
    best = np.flatnonzero(counts == counts.max())
    chosen = min(best, key=lambda i: (abs(int(values[i])), int(values[i])))
    return int(values[chosen]), int(counts[chosen])


def smallest_sparse_bytes(q: np.ndarray, fill_count: int) -> int:
    """The fewest bytes any sparse form of ``q`` can take: its mask and its values (the fill
    first), gap offsets not counted. Where this exceeds the dense tensor's bytes no form may be
    taken (the file's bytes must not grow), so a dense tensor (a weight nobody pruned, whose most
    common value holds less than an eighth of it) needs no trial at all: on all-MiniLM-L6-v2 static
    int8 those trials were 0.85 of the 7 s the job took."""
    return -(-q.size // 8) + (q.size - fill_count + 1) * q.itemsize


def pack(q: np.ndarray, fill: int | None = None) -> Packed:
    """The sparse form of the integer tensor ``q`` (fill: its most common value unless given)."""
    fill = fill_value(q) if fill is None else fill
    flat = q.reshape(-1)
    kept = flat != fill
    mask = np.packbits(kept, bitorder="little").reshape(-1, 1)
    values = np.concatenate([np.array([fill], dtype=q.dtype), flat[kept]])
    return Packed(mask, values, tuple(int(d) for d in q.shape))


def _entropy_bytes(values: np.ndarray) -> float:
    """Order-0 entropy of ``values`` in bytes: what zstd's literal coding approaches."""
    _, counts = value_counts(values)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8.0)


def _centered(q: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(the grid's zero, q - zero in int16, where q is not the zero) for a tensor whose fill is its
    grid's zero and that holds something else; otherwise None: no gap to close."""
    center = GAP_CENTER.get(q.dtype)
    if center is None or q.ndim == 0 or fill_value(q) != center:
        return None
    wide = q.astype(np.int16) - center
    kept = wide != 0
    return (center, wide, kept) if kept.any() else None


def close_gap(q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(shifted tensor, offsets) for an integer tensor whose fill is its grid's zero (``GAP_CENTER``),
    along the axis whose shift saves most order-0 entropy, or None where no axis saves ``MIN_GAIN``
    bytes beyond the offsets' own. ``sparse_form.open_gap`` inverts it exactly; the fill stays the fill, other
    values keep their side of it."""
    centered = _centered(q)
    if centered is None:
        return None
    center, wide, kept = centered
    before = _entropy_bytes(wide[kept])
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for axis in range(q.ndim):
        if q.shape[axis] < 2:
            continue
        others = tuple(a for a in range(q.ndim) if a != axis)
        smallest = np.where(kept, np.abs(wide), 128).min(axis=others, keepdims=True)
        offsets = np.where(smallest == 128, 0, smallest - 1).astype(np.int16)
        shifted = wide - np.sign(wide) * offsets
        # the offsets cost about log2 of their spread each (zstd codes their narrow range so)
        spread = int(offsets.max() - offsets.min()) + 1
        gain = before - _entropy_bytes(shifted[kept]) - offsets.size * max(np.log2(spread), 1.0) / 8.0
        if gain >= MIN_GAIN and (best is None or gain > best[0]):
            best = (gain, (shifted + center).astype(q.dtype), offsets.astype(np.int8))
    return None if best is None else (best[1], best[2])


def shift_whole(q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``close_gap`` with one offset for the whole tensor (offsets shaped [1] * ndim), where the
    fill is the grid's zero and every other value lies beyond +-1; otherwise None.

    It saves nothing in the tensor's own entropy (a shift keeps it), but its values then start at
    +-1 as every closed tensor's do: a per-tensor grid pruned at a per-layer threshold puts each
    layer's values on a range of its own, and a zstd block they share codes the union of those
    ranges. Whether that pays depends on the neighbours, so ``store_sparse`` measures it."""
    centered = _centered(q)
    if centered is None:
        return None
    center, wide, kept = centered
    smallest = int(np.abs(wide[kept]).min())
    if smallest < 2:
        return None
    offsets = np.full((1,) * q.ndim, smallest - 1, dtype=np.int16)
    return (wide - np.sign(wide) * offsets + center).astype(q.dtype), offsets.astype(np.int8)


# ---------------------------------------------------------------------------- graph


def _decode_nodes(model: onnx.ModelProto, weight: str, mask: str, values: str, count: str, shape: str,
                  shared: dict[str, str], index_type: int, base: str | None = None) -> list[onnx.NodeProto]:
    base = base or weight
    names = [graph.unique_name(model, f"{base}_sparse_{step}")
             for step in ("high", "bits", "flat", "flags", "widened", "ranks", "index", "dense")]
    return [
        helper.make_node("BitShift", [mask, shared["left"]], [names[0]], name=names[0], direction="LEFT"),
        helper.make_node("BitShift", [names[0], shared["right"]], [names[1]], name=names[1], direction="RIGHT"),
        helper.make_node("Reshape", [names[1], shared["flat"]], [names[2]], name=names[2]),
        helper.make_node("Slice", [names[2], shared["start"], count], [names[3]], name=names[3]),
        helper.make_node("Cast", [names[3]], [names[4]], name=names[4], to=index_type),
        helper.make_node("CumSum", [names[4], shared["axis"]], [names[5]], name=names[5]),
        helper.make_node("Mul", [names[5], names[4]], [names[6]], name=names[6]),
        helper.make_node("Gather", [values, names[6]], [names[7]], name=names[7], axis=0),
        helper.make_node("Reshape", [names[7], shape], [weight], name=graph.unique_name(model, f"{base}_sparse")),
    ]


def _gap_nodes(model: onnx.ModelProto, weight: str, shifted: str, offsets: str, dtype: int,
               center: str | None) -> list[onnx.NodeProto]:
    """``center``: the int32 initializer holding the grid's zero where it is not 0 (uint8)."""
    names = [graph.unique_name(model, f"{weight}_gap_{step}")
             for step in ("wide", "centered", "sign", "offsets", "step", "sum")]
    nodes = [helper.make_node("Cast", [shifted], [names[0]], name=names[0], to=TensorProto.INT32)]
    if center is not None:
        nodes.append(helper.make_node("Sub", [names[0], center], [names[1]], name=names[1]))
    nodes += [
        helper.make_node("Sign", [names[1] if center is not None else names[0]], [names[2]], name=names[2]),
        helper.make_node("Cast", [offsets], [names[3]], name=names[3], to=TensorProto.INT32),
        helper.make_node("Mul", [names[2], names[3]], [names[4]], name=names[4]),
        helper.make_node("Add", [names[0], names[4]], [names[5]], name=names[5]),
        helper.make_node("Cast", [names[5]], [weight], name=graph.unique_name(model, f"{weight}_gap"), to=dtype),
    ]
    return nodes


def _shared_constants(model: onnx.ModelProto) -> tuple[dict[str, str], list[str]]:
    """The decoding's small constants, one copy for every sparse weight of the graph (found again
    where a graph already has them: a model compressed twice); returns them and those added."""
    wanted = {
        "left": ("sparse_shift_left", (7 - np.arange(8)).astype(np.uint8)),
        "right": ("sparse_shift_right", np.array([7], dtype=np.uint8)),
        "flat": ("sparse_flat_shape", np.array([-1], dtype=np.int64)),
        "start": ("sparse_slice_start", np.array([0], dtype=np.int64)),
        "axis": ("sparse_cumsum_axis", np.array(0, dtype=np.int64)),
    }
    inits = graph.initializers(model)
    out, added = {}, []
    for key, (name, array) in wanted.items():
        tensor = inits.get(name)
        if tensor is not None and tensor.data_type == numpy_helper.from_array(array).data_type and \
                np.array_equal(numpy_helper.to_array(tensor), array):
            out[key] = name
            continue
        out[key] = graph.unique_name(model, name)
        added.append(out[key])
        model.graph.initializer.append(numpy_helper.from_array(array, out[key]))
    return out, added


def candidates(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Integer (int8 / uint8) initializers of the main graph worth trying: at least
    ``MIN_ELEMENTS`` elements, not also a graph input (a caller may feed its own), in the file."""
    graph_inputs = {value.name for value in model.graph.input}
    stored = {name for sparse in find_sparse_weights(model.graph) for name in sparse.inputs()}
    return [t for t in model.graph.initializer
            if t.data_type in PACKABLE and int(np.prod(t.dims, dtype=np.int64)) >= MIN_ELEMENTS
            and t.name not in graph_inputs and t.name not in stored and t.data_location != TensorProto.EXTERNAL]


@dataclass
class _Rewrite:
    """One tensor's sparse form as added to the graph, so that it can be taken back."""

    dense: onnx.TensorProto
    added: list[str]
    nodes: list[onnx.NodeProto]


def _apply(model: onnx.ModelProto, tensor: onnx.TensorProto, packed: Packed, shared: dict[str, str]) -> _Rewrite:
    # the graph's names read once for the dozen this rewrite asks for (each on its own base, so the
    # same names as one read per call: that was 0.35 s of the PP-OCR recognizer's static int8 job)
    with graph.naming(model):
        return _apply_named(model, tensor, packed, shared)


def _apply_named(model: onnx.ModelProto, tensor: onnx.TensorProto, packed: Packed, shared: dict[str, str]) -> _Rewrite:
    name = tensor.name
    mask_name = graph.unique_name(model, f"{name}_sparse_mask")
    values_name = graph.unique_name(model, f"{name}_sparse_values")
    count_name = graph.unique_name(model, f"{name}_sparse_count")
    shape_name = graph.unique_name(model, f"{name}_sparse_shape")
    index_type = TensorProto.INT32 if packed.count <= INT32_INDEX_LIMIT else TensorProto.INT64
    added = [numpy_helper.from_array(packed.mask, mask_name),
             numpy_helper.from_array(packed.values, values_name),
             numpy_helper.from_array(np.array([packed.count], dtype=np.int64), count_name),
             numpy_helper.from_array(np.array(packed.shape, dtype=np.int64), shape_name)]
    if packed.offsets is None:
        nodes = _decode_nodes(model, name, mask_name, values_name, count_name, shape_name, shared, index_type)
    else:
        offsets_name = graph.unique_name(model, f"{name}_sparse_offsets")
        shifted_name = graph.unique_name(model, f"{name}_sparse_shifted")
        added.append(numpy_helper.from_array(packed.offsets, offsets_name))
        center = GAP_CENTER[packed.values.dtype]
        center_name = graph.unique_name(model, f"{name}_sparse_center") if center else None
        if center_name is not None:
            added.append(numpy_helper.from_array(np.array(center, dtype=np.int32), center_name))
        nodes = _decode_nodes(model, shifted_name, mask_name, values_name, count_name, shape_name, shared,
                              index_type, base=name)
        nodes += _gap_nodes(model, name, shifted_name, offsets_name, tensor.data_type, center_name)
    # the sparse form takes the dense tensor's place in the file (neighbours matter to zstd)
    index = _index_of(model, name)
    dense = onnx.TensorProto()
    dense.CopyFrom(tensor)
    del model.graph.initializer[index]
    for offset, new in enumerate(added):
        model.graph.initializer.insert(index + offset, new)
    # the decoding nodes go first: every reader of the weight comes after them
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return _Rewrite(dense, [t.name for t in added], nodes)


def _bytes_saved(model: onnx.ModelProto, rewrite: _Rewrite) -> int:
    """The graph's bytes the rewrite saved: the dense tensor's entry less the entries of the tensors
    and nodes it added (tag, length, payload each). Measured on these messages alone: the model's
    ByteSize serializes all of it (four times 0.04 s on MiniLM's int8 file, to compare 2 KB)."""
    names = set(rewrite.added)
    added = [t for t in model.graph.initializer if t.name in names]
    return _entry_bytes(rewrite.dense) - sum(_entry_bytes(m) for m in added + list(rewrite.nodes))


def _entry_bytes(message) -> int:
    """Bytes ``message`` takes as an entry of a GraphProto's node or initializer list (a one-byte tag,
    the varint length, the payload)."""
    size = message.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def _index_of(model: onnx.ModelProto, name: str) -> int:
    return next(i for i, t in enumerate(model.graph.initializer) if t.name == name)


def _undo(model: onnx.ModelProto, rewrite: _Rewrite) -> None:
    """Put the dense tensor back where it was; drop the sparse form and its decoding nodes."""
    index = _index_of(model, rewrite.added[0])
    for _ in rewrite.added:
        del model.graph.initializer[index]
    model.graph.initializer.insert(index, rewrite.dense)
    for node in rewrite.nodes:
        position = next(i for i, n in enumerate(model.graph.node) if n.name == node.name)
        del model.graph.node[position]


def _sparse_forms(q: np.ndarray) -> list[Packed]:
    """``q``'s bitmask + values forms worth trying, the first the one judged alone: the gap closed
    along an axis where that pays, else the whole tensor shifted (the values of every closed tensor
    start at +-1), then the values as they are. Empty where nothing equals the fill."""
    packed = pack(q)
    if packed.values.size - 1 == q.size:
        return []
    gap = close_gap(q) or shift_whole(q)
    if gap is None:
        return [packed]
    shifted = pack(gap[0], fill=GAP_CENTER[q.dtype])     # the same mask; values nearer each other
    shifted.offsets = gap[1]
    return [shifted, packed]


def _gap_of(packed: Packed) -> str | None:
    """How the form's gap around zero was closed: "channel" (an offset per slice), "tensor", or None."""
    if packed.offsets is None:
        return None
    return "tensor" if packed.offsets.size == 1 else "channel"


def _zstd_alone(packed: Packed) -> int:
    return (zstd_size(packed.mask.tobytes()) + zstd_size(packed.values.tobytes())
            + (0 if packed.offsets is None else zstd_size(packed.offsets.tobytes())))


def store_sparse(model: onnx.ModelProto, whole_file_work: int | None = None, by: str = "zstd") -> dict[str, dict]:
    """Rewrite, in place, every candidate integer weight whose sparse form makes the file compress
    smaller (see the module docstring). Returns, for each tensor looked at, its dense and sparse
    bytes (raw and zstd) and whether it was stored sparse.

    ``by="raw"``: the file's own bytes decide instead (a goal that minimizes ``size``: the file as
    it lies on disk, not as it travels): a tensor goes sparse where its smallest sparse form, with
    its decoding nodes, makes the serialized model ``MIN_GAIN`` bytes smaller; no zstd trials.

    First each tensor alone: its sparse form is taken where the mask's and values' zstd bytes plus the
    decoding nodes' undercut the dense tensor's by ``MIN_GAIN``. That is what counts where tensors
    span zstd blocks of their own, and a good start elsewhere. Then, where compressing the whole
    serialized model a few times per candidate stays within ``whole_file_work`` bytes, each tensor,
    largest first, is tried in its other states (dense, or its other sparse form: see
    ``_sparse_forms``) on the whole file, laid out as ``file_layout`` lays it out, and moved where
    that saves ``MIN_GAIN`` bytes: zstd codes all literals of a 128 KiB block with one Huffman table,
    so a tensor's bytes cost what they cost next to its neighbours. (Starting from the dense file
    instead, the first tensors judged share blocks with dense tensors full of zeros, and were refused
    a form that saves 4 KB once their neighbours are sparse too: on the bench transformer that left
    9 KB, 3 %, on the table.)"""
    if graph.opset(model) < MIN_OPSET:
        return {}
    found = [t.name for t in sorted(candidates(model), key=lambda t: -int(np.prod(t.dims, dtype=np.int64)))]
    if not found:
        return {}
    whole_file_work = WHOLE_FILE_WORK if whole_file_work is None else whole_file_work
    shared, added = _shared_constants(model)
    decisions: dict[str, dict] = {}
    forms: dict[str, list[Packed]] = {}          # forms that may be taken: the file's bytes do not grow
    rewrites: dict[str, tuple[int, _Rewrite]] = {}   # the form each sparse tensor is in
    for name in found:
        tensor = model.graph.initializer[_index_of(model, name)]
        q = numpy_helper.to_array(tensor)
        fill, fill_count = fill_and_count(q)
        floor = smallest_sparse_bytes(q, fill_count)
        if floor > q.nbytes:                     # every form would grow the file: not tried
            decisions[name] = {"elements": int(q.size), "fill": fill, "kept": int(q.size - fill_count),
                               "bytes": int(q.nbytes), "bytes_sparse": floor, "gap_closed": None, "sparse": False}
            continue
        tried = _sparse_forms(q)
        if not tried:                            # nothing equals the fill value: no gain possible
            continue
        packed = tried[0]
        row = {"elements": int(q.size), "fill": int(packed.values[0]), "kept": int(packed.values.size - 1),
               "bytes": int(q.nbytes), "bytes_sparse": int(packed.nbytes), "zstd": zstd_size(q.tobytes()),
               "zstd_sparse": _zstd_alone(packed), "gap_closed": _gap_of(packed), "sparse": False}
        decisions[name] = row
        allowed = []
        for candidate in tried:
            if candidate.nbytes > row["bytes"]:  # the file would grow: M counts its bytes
                continue
            rewrite = _apply(model, _dense(model, name), candidate, shared)
            saved = _bytes_saved(model, rewrite)   # < 0: the decoding nodes outweigh what the mask saved
            overhead = zstd_size(b"".join(node.SerializeToString() for node in rewrite.nodes))
            _undo(model, rewrite)
            if saved >= 0:
                allowed.append((candidate, overhead if by == "zstd" else -saved))
        if not allowed:
            continue
        if by == "raw":
            best, cost = min(allowed, key=lambda pair: pair[1])
            if -cost >= MIN_GAIN:
                rewrites[name] = (0, _apply(model, _dense(model, name), best, shared))
                row.update(sparse=True, kept=int(best.values.size - 1), bytes_sparse=int(best.nbytes),
                           zstd_sparse=_zstd_alone(best), gap_closed=_gap_of(best))
            continue
        forms[name] = [candidate for candidate, _ in allowed]
        first, overhead = allowed[0]
        if first is packed and row["zstd_sparse"] + overhead <= row["zstd"] - MIN_GAIN:
            rewrites[name] = (0, _apply(model, _dense(model, name), first, shared))
            row["sparse"] = True
    if by == "zstd" and forms and model.ByteSize() * sum(len(f) for f in forms.values()) <= whole_file_work:
        current = file_layout.arranged_zstd(model)   # laid out as it will be
        for name, choices in forms.items():      # largest first, as found
            row = decisions[name]
            state = rewrites[name][0] if name in rewrites else -1      # -1: dense
            row["file_zstd_" + ("dense" if state < 0 else "sparse")] = current
            for other in [-1, *range(len(choices))]:
                if other == state:
                    continue
                if state >= 0:
                    _undo(model, rewrites.pop(name)[1])
                if other >= 0:
                    rewrites[name] = (other, _apply(model, _dense(model, name), choices[other], shared))
                trial = file_layout.arranged_zstd(model)
                row.setdefault("file_zstd_" + ("dense" if other < 0 else "sparse"), trial)
                if trial <= current - MIN_GAIN:
                    current, state = trial, other
                    continue
                if other >= 0:                   # back to the state it was in
                    _undo(model, rewrites.pop(name)[1])
                if state >= 0:
                    rewrites[name] = (state, _apply(model, _dense(model, name), choices[state], shared))
            row["sparse"] = state >= 0
            if state >= 0:
                chosen = choices[state]
                row.update(kept=int(chosen.values.size - 1), bytes_sparse=int(chosen.nbytes),
                           zstd_sparse=_zstd_alone(chosen), gap_closed=_gap_of(chosen))
    if not rewrites:
        graph.remove_initializers(model, added)
    return decisions


def _dense(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return model.graph.initializer[_index_of(model, name)]


def store_pipeline_output(model: onnx.ModelProto, layers: dict, by: str = "zstd") -> dict[str, dict]:
    """``store_sparse`` on a pipeline's final model; each layer whose integer weight went sparse
    says so in its record (the report's ``storage``). Bits, sparsity and params of a layer do not
    change: the decoded tensor is the dense one, value for value."""
    decisions = store_sparse(model, by=by)
    for stored, row in decisions.items():
        if not row["sparse"]:
            continue
        # every quantizer names a weight's integer tensor "<weight>_<suffix>" (graph.unique_name)
        owners = [name for name in layers if stored == name or stored.startswith(f"{name}_")]
        if owners:
            layers[max(owners, key=len)].extra["storage"] = (
                f"bitmask + {row['kept']} of {row['elements']} values (the rest {row['fill']})"
                + {"channel": ", each channel's gap around 0 closed", "tensor": ", its gap around 0 closed",
                   None: ""}[row["gap_closed"]])
    return decisions
