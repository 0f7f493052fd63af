"""Calibration / evaluation data sets (docs/datasets.md) checked against a model and fed in batches.

An .npz holds one array per model input, keyed by the input's name, plus optional ``_labels``.
The array's rank tells its layout: the input's own rank = samples concatenated along the input's
first axis; one more = whole inputs stacked on a new first axis. Samples go in batches where every
input's first axis is dynamic and concatenated, one at a time otherwise.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

LABELS = "_labels"

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


class DataError(ValueError):
    """A data set that does not fit the model; ``path`` names the array at fault."""

    def __init__(self, message: str, path: list[str]):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]   # ints for fixed dims, names / None for dynamic ones

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs are not among them)."""
    init_names = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(_ONNX_TO_NUMPY.get(tensor_type.elem_type, np.float32)), dims))
    return specs


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array; pickled / object arrays are refused (allow_pickle=False). A file that is
    not a zip archive of named arrays (a lone .npy, a damaged download) raises ValueError saying so
    (it was a zipfile.BadZipFile or TypeError traceback)."""
    try:
        loaded = np.load(str(path), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive of arrays named after the model's inputs")
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not an .npz (zip) archive: {exc}") from None


@dataclass
class Dataset:
    """A data set bound to one model's inputs. ``stacked[name]`` tells the layout of each array."""

    arrays: dict[str, np.ndarray]
    stacked: dict[str, bool]
    labels: np.ndarray | None
    specs: list[InputSpec]
    size: int

    @property
    def batchable(self) -> bool:
        return all(spec.batch_dynamic and not self.stacked[spec.name] for spec in self.specs)

    def _sample(self, name: str, start: int, stop: int) -> np.ndarray:
        array = self.arrays[name]
        if self.stacked[name]:
            return np.asarray(array[start])   # one whole input (an array even for a scalar input)
        return array[start:stop]

    def batches(self, batch_size: int = 64, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Model feeds: ``batch_size`` samples at a time where batchable, else one sample each."""
        total = self.size if limit is None else min(limit, self.size)
        step = batch_size if self.batchable else 1
        for start in range(0, total, step):
            stop = min(start + step, total)
            yield {spec.name: self._sample(spec.name, start, stop) for spec in self.specs}

    def label_batches(self, batch_size: int = 64, limit: int | None = None) -> Iterator[np.ndarray]:
        """Labels aligned with ``batches`` (same arguments)."""
        if self.labels is None:
            return
        total = self.size if limit is None else min(limit, self.size)
        step = batch_size if self.batchable else 1
        for start in range(0, total, step):
            yield self.labels[start:min(start + step, total)]

    def batch_for(self, max_input_bytes: int, cap: int) -> int:
        """The largest batch (at most ``cap``) whose model inputs take at most ``max_input_bytes``:
        32 token-id rows are kilobytes, 32 images of 3 x 480 x 480 are 88 MB, and what a model
        holds while it runs a batch is a multiple of its inputs."""
        if self.size == 0:
            return cap
        per_sample = sum(int(np.asarray(self._sample(spec.name, 0, 1)).nbytes) for spec in self.specs)
        return max(1, min(cap, max_input_bytes // max(per_sample, 1)))

    def slice(self, start: int, stop: int) -> "Dataset":
        """Samples ``start`` to ``stop`` (views, no copy)."""
        stop = min(stop, self.size)
        start = min(start, stop)
        return Dataset({k: v[start:stop] for k, v in self.arrays.items()}, self.stacked,
                       None if self.labels is None else self.labels[start:stop], self.specs, stop - start)

    def head(self, count: int) -> "Dataset":
        count = min(count, self.size)
        return Dataset({k: v[:count] for k, v in self.arrays.items()}, self.stacked,
                       None if self.labels is None else self.labels[:count], self.specs, count)


def bind(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> Dataset:
    """Check ``arrays`` against the model's inputs (names, rank, fixed dims, dtype, finiteness)
    and return a Dataset; DataError names the array at fault."""
    specs = input_specs(model)
    expected = {spec.name for spec in specs}
    extra = sorted(set(arrays) - expected - {LABELS})
    if extra:
        raise DataError(f"array {extra[0]!r} matches no model input (inputs: {sorted(expected)})", [extra[0]])
    converted: dict[str, np.ndarray] = {}
    stacked: dict[str, bool] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"missing array for model input {spec.name!r}", [spec.name])
        array = np.asarray(arrays[spec.name])
        if array.dtype.kind not in "biuf":
            raise DataError(f"array {spec.name!r} has dtype {array.dtype}, not a number type", [spec.name])
        rank = len(spec.shape)
        if array.ndim == rank + 1:
            stacked[spec.name], sample_shape, sizes[spec.name] = True, array.shape[1:], array.shape[0]
        elif array.ndim == rank and rank > 0:
            stacked[spec.name], sample_shape, sizes[spec.name] = False, array.shape, array.shape[0]
        else:
            raise DataError(f"array {spec.name!r} has rank {array.ndim}; input rank is {rank} "
                            f"(give rank {rank} concatenated or {rank + 1} stacked)", [spec.name])
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0 and sample_shape[axis] != dim:
                if axis == 0 and not stacked[spec.name] and dim == 1:
                    continue   # concatenated samples along a fixed batch axis of 1: fed one by one
                raise DataError(f"array {spec.name!r} has shape {array.shape}; input wants {spec.shape}", [spec.name])
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"array {spec.name!r} holds NaN or Inf", [spec.name])
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise DataError(f"array {spec.name!r} has dtype {array.dtype}; input wants {spec.dtype}", [spec.name])
        converted[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    if len(set(sizes.values())) > 1:
        raise DataError(f"arrays hold different numbers of samples: {sizes}", [next(iter(sizes))])
    size = next(iter(sizes.values())) if sizes else 0
    labels = None
    if LABELS in arrays:
        labels = np.asarray(arrays[LABELS])
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != size:
            raise DataError(f"_labels must be integer class ids of shape [{size}]", [LABELS])
        _check_label_range(model, labels)
    return Dataset(converted, stacked, labels, specs, size)


FLOAT_ELEMENT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                       onnx.TensorProto.BFLOAT16)


def _classes(model: onnx.ModelProto) -> tuple[str, int | None] | None:
    """(name, class count) of the output accuracy reads: the first float output of rank 2 that can
    hold more than one score per sample (``metrics`` takes the first such array at run time); the
    count is None where that axis is not fixed."""
    for value in model.graph.output:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape") or len(tensor.shape.dim) != 2:
            continue
        if tensor.elem_type not in FLOAT_ELEMENT_TYPES:
            continue
        axis = tensor.shape.dim[1]
        if axis.HasField("dim_value") and axis.dim_value <= 1:
            continue
        return value.name, (axis.dim_value if axis.HasField("dim_value") else None)
    return None


def _check_label_range(model: onnx.ModelProto, labels: np.ndarray) -> None:
    """Class ids the model cannot output would count as errors and lower its accuracy without
    saying why (labels from 1 where the scores count from 0, a -1 for "unlabelled")."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    found = _classes(model)
    if low < 0:
        raise DataError(f"_labels holds class id {low}; class ids count from 0", [LABELS])
    if found is not None and found[1] is not None and high >= found[1]:
        raise DataError(f"_labels holds class id {high}; the model's output {found[0]!r} scores {found[1]} "
                        f"classes (ids 0..{found[1] - 1})", [LABELS])


def generated(model: onnx.ModelProto, count: int = 32, seed: int = 0) -> Dataset:
    """Inputs drawn from N(0, 1) (integers from 0..9) for fidelity when the user gave no data.
    Dynamic dims other than the batch axis become 1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in input_specs(model):
        dims = [count] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 1:
            dims = [count] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            arrays[spec.name] = rng.integers(0, 10, dims).astype(spec.dtype)
    return bind(model, arrays)
