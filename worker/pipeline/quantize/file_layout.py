"""The order of a model's initializers in its file, chosen for zstd (docs/report.md's
``transport_size_ratio``: ``metrics.zstd_bytes``, level 3, streamed).

Why the order matters: zstd at level 3 cuts its input into blocks of 128 KiB at fixed offsets and
codes each block's literals with one Huffman table. Tensors of different kinds have different byte
distributions: sparse values (peaked, with no zero), dense integers (peaked at zero), floats (near
uniform low bytes, a narrow exponent byte) and sparse masks (uniform). Where two kinds share a block,
each is coded with a table that fits neither; where a kind fills blocks of its own, each is coded
near its own entropy. Which order puts the boundaries best depends on the kinds' sizes, so it is
measured: every order of the kinds present is compressed, and the smallest is kept, where the work
stays within ``LAYOUT_WORK`` bytes through zstd (otherwise the file is left as it is). The
order never changes what a tensor holds, only where it lies; the file is left as it is unless an
order makes it smaller.
"""
from __future__ import annotations

import itertools
from typing import Any

import onnx
from onnx import TensorProto

from worker.pipeline.quantize.sparse_form import find_sparse_weights

VALUES, INTEGERS, FLOATS, MASKS, REST = "values", "integers", "floats", "masks", "rest"
# the order measured best on the bench models pruned 50 % and quantized int8; the fallback order
DEFAULT_ORDER = (VALUES, INTEGERS, FLOATS, MASKS, REST)
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8}
# Bytes zstd may go through measuring orders. Order matters where tensors are small against zstd's
# 128 KiB blocks: on MiniLM's 23 MB int8 file the best of 6 orders saved 0.08 % (16 KB) for 0.45 s,
# a tenth of the static int8 job, and the default order measured alone still took 0.4 s of its 4.9 s:
# files whose every order does not fit are left as they are.
LAYOUT_WORK = 64 << 20
LAYOUT_LIMIT = 256 << 20            # files past this are left as they are
ZSTD_LEVEL = 3                      # as metrics.zstd_bytes measures the file


def zstd_size(data: bytes) -> int:
    """Bytes after zstd at ``ZSTD_LEVEL``, streamed without a size hint as ``metrics.zstd_bytes``
    compresses a file (a size hint picks other parameters and other sizes)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    return len(compressor.compress(data)) + len(compressor.flush())


def kind_of(tensor: onnx.TensorProto, masks: set[str], values: set[str]) -> str:
    """``masks`` / ``values``: names of the sparse forms' masks and value tensors (gap offsets
    count as values: the same narrow integers)."""
    if tensor.name in masks:
        return MASKS
    if tensor.name in values:
        return VALUES
    if tensor.data_type in INTEGER_TYPES:
        return INTEGERS
    return FLOATS if tensor.data_type == TensorProto.FLOAT else REST


def _sparse_parts(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    found = find_sparse_weights(model.graph)
    return ({s.mask for s in found},
            {s.values for s in found} | {s.offsets for s in found if s.offsets is not None})


def arrange(model: onnx.ModelProto, order: tuple[str, ...] = DEFAULT_ORDER,
            parts: tuple[set[str], set[str]] | None = None) -> None:
    """Lay the main graph's initializers out kind by kind in ``order`` (stable within a kind)."""
    masks, values = _sparse_parts(model) if parts is None else parts
    rank = {kind: i for i, kind in enumerate(order)}
    ordered = sorted(model.graph.initializer, key=lambda t: rank[kind_of(t, masks, values)])
    copies = []
    for tensor in ordered:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copies.append(copy)
    del model.graph.initializer[:]
    model.graph.initializer.extend(copies)


def arranged_zstd(model: onnx.ModelProto, order: tuple[str, ...] = DEFAULT_ORDER,
                  parts: tuple[set[str], set[str]] | None = None) -> int:
    """The file's zstd bytes with its initializers laid out in ``order`` (measured on a copy)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    arrange(copy, order, parts)
    return zstd_size(copy.SerializeToString())


class Serialized:
    """A model's file, serialized once, that can be re-laid out without serializing it again.

    The initializers are one field repeated (GraphProto field 5), so in the file they lie back to
    back, each as its tag, its length and its bytes: the file with another order is the same bytes
    before and after that run, and the entries in between in the new order (the lengths do not
    change, so neither do the graph's). Measuring an order then costs a join and zstd, not a copy of
    the model, a copy of every tensor and a serialization (1.85 of static int8's 7 s on
    all-MiniLM-L6-v2 went to those for six orders). ``spliced`` is None where the run is not found
    where expected; callers then lay out a copy (``arranged_zstd``)."""

    def __init__(self, model: onnx.ModelProto):
        self.data = model.SerializeToString()
        self.entries = [_entry(tensor.SerializeToString()) for tensor in model.graph.initializer]
        self.start = self._run_start()

    def _run_start(self) -> int | None:
        if not self.entries:
            return None
        length = sum(len(entry) for entry in self.entries)
        start = self.data.find(self.entries[0])
        while start >= 0:
            if self.data[start:start + length] == b"".join(self.entries):
                return start
            start = self.data.find(self.entries[0], start + 1)
        return None

    def spliced(self, order: list[int]) -> bytes | None:
        """The file with the initializers in ``order`` (indices into the model's initializers)."""
        if self.start is None:
            return None
        end = self.start + sum(len(entry) for entry in self.entries)
        return b"".join([self.data[:self.start], *(self.entries[i] for i in order), self.data[end:]])


def _entry(payload: bytes) -> bytes:
    """One GraphProto.initializer entry as the file holds it: tag (field 5, length-delimited),
    varint length, bytes."""
    length, varint = len(payload), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([5 << 3 | 2]) + bytes(varint) + payload


def order_of(model: onnx.ModelProto, order: tuple[str, ...], parts: tuple[set[str], set[str]]) -> list[int]:
    """The initializers' indices as ``arrange`` lays them out (kind by kind, stable within a kind)."""
    masks, values = parts
    rank = {kind: i for i, kind in enumerate(order)}
    kinds = [rank[kind_of(tensor, masks, values)] for tensor in model.graph.initializer]
    return sorted(range(len(kinds)), key=kinds.__getitem__)


def order_initializers(model: onnx.ModelProto, work: int = LAYOUT_WORK, limit: int = LAYOUT_LIMIT) -> dict[str, Any]:
    """Lay the initializers out in the order of kinds that makes the file's zstd bytes smallest
    (see the module docstring), in place; returns what was measured. Files past ``limit`` bytes
    are left as they are (each tensor spans blocks of its own there)."""
    size = model.ByteSize()
    if size > limit or len(model.graph.initializer) < 2:
        return {"arranged": False}
    parts = _sparse_parts(model)
    present = {kind_of(t, *parts) for t in model.graph.initializer}
    kinds = tuple(kind for kind in DEFAULT_ORDER if kind in present)
    orders = list(itertools.permutations(kinds))
    if size * (len(orders) + 1) > work:
        return {"arranged": False, "orders_measured": 0}
    serialized = Serialized(model)
    current = zstd_size(serialized.data)

    def measured(order: tuple[str, ...]) -> int:
        data = serialized.spliced(order_of(model, order, parts))
        return arranged_zstd(model, order, parts) if data is None else zstd_size(data)

    best_size, best_order = min((measured(order), order) for order in orders)
    if best_size < current:
        arrange(model, best_order, parts)
        return {"arranged": True, "order": list(best_order), "file_zstd": current, "file_zstd_arranged": best_size,
                "orders_measured": len(orders)}
    return {"arranged": False, "file_zstd": current, "file_zstd_arranged": best_size, "orders_measured": len(orders)}
