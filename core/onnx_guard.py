"""Validation of an uploaded ONNX file before anything else touches it (an upload is untrusted input).

``validate(path)`` parses the protobuf without loading external data, then checks, in every place a
tensor can hide (initializers, sparse initializers, Constant and other tensor attributes, local
functions, subgraphs of If/Loop/Scan):

- declared dims are non-negative and their product stays under ``max_tensor_elements``;
- graph and function nesting stays under ``max_graph_depth``;
- external-data entries use only the known keys, non-negative integer offset/length, a relative
  ``location`` that after ``realpath`` stays inside the model's directory and names a regular file
  (no symlink, no hardlink) long enough for offset+length, with a length that matches the dims;
- every operator domain is in the allow-list (or is a local function of the model);

and finally runs ``onnx.checker.check_model``. It never runs the model. Any failure raises
``InvalidModel`` naming the problem.
"""
from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import AttributeProto, GraphProto, TensorProto
from google.protobuf.message import DecodeError

from core import onnx_weights
from core.errors import InvalidModel
from core.settings import Settings, get_settings

EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


@dataclass(frozen=True)
class ModelInfo:
    params: int
    opset: int
    ir_version: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def validate(path: Path, settings: Settings | None = None) -> ModelInfo:
    """Check the ONNX file at ``path``; return what the API reports about it."""
    settings = settings or get_settings()
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InvalidModel("the upload is empty", [{"loc": ["file"], "msg": "empty file"}])
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InvalidModel(f"not an ONNX model: the protobuf does not parse ({type(exc).__name__})",
                           [{"loc": ["file"], "msg": "not an ONNX ModelProto"}]) from exc
    if not model.HasField("graph") or not model.ir_version:
        raise InvalidModel("not an ONNX model: no graph or IR version", [{"loc": ["file"], "msg": "not an ONNX ModelProto"}])

    guard = _Guard(settings, path.parent)
    guard.check_model(model)
    try:
        onnx.checker.check_model(str(path))  # the path form resolves external data beside the file
    except (onnx.checker.ValidationError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModel(f"the ONNX checker refuses the model: {_first_line(str(exc))}",
                           [{"loc": ["file"], "msg": "onnx.checker failed"}]) from exc
    return _describe(model, guard.params)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:500]


class _Guard:
    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = os.path.realpath(model_dir)
        self.params = 0
        self.local_domains: set[str] = set()

    def check_model(self, model: onnx.ModelProto) -> None:
        allowed = set(self.settings.allowed_domains)
        self.local_domains = {f.domain for f in model.functions}
        for opset in model.opset_import:
            if opset.domain not in allowed and opset.domain not in self.local_domains:
                raise InvalidModel(f"operator domain {opset.domain!r} is not allowed",
                                   [{"loc": ["opset_import", opset.domain], "msg": "domain not in allow-list"}])
        for init in model.graph.initializer:
            self.params += self._elements(init, f"initializer {init.name!r}")
        for sparse in model.graph.sparse_initializer:
            self.params += self._elements(sparse.values, f"sparse initializer {sparse.values.name!r}")
        self._graph(model.graph, depth=1, where="graph")
        for function in model.functions:
            self._nodes(function.node, depth=2, where=f"function {function.name!r}")
        # Weights held in Constant nodes (paddle2onnx and other converters) are weights too: the
        # pipeline lifts them to initializers (their dims were checked by _graph above).
        self.params += onnx_weights.constant_weight_params(model) + onnx_weights.body_constant_weight_params(model)

    def _graph(self, graph: GraphProto, depth: int, where: str) -> None:
        if depth > self.settings.max_graph_depth:
            raise InvalidModel(f"subgraphs nest deeper than {self.settings.max_graph_depth}",
                               [{"loc": ["graph"], "msg": "nesting too deep"}])
        for init in graph.initializer:
            self._tensor(init, f"{where} initializer {init.name!r}")
        for sparse in graph.sparse_initializer:
            self._tensor(sparse.values, f"{where} sparse initializer")
            self._tensor(sparse.indices, f"{where} sparse initializer indices")
        self._nodes(graph.node, depth, where)

    def _nodes(self, nodes: Any, depth: int, where: str) -> None:
        if depth > self.settings.max_graph_depth:
            raise InvalidModel(f"subgraphs nest deeper than {self.settings.max_graph_depth}",
                               [{"loc": ["graph"], "msg": "nesting too deep"}])
        allowed = set(self.settings.allowed_domains)
        for node in nodes:
            if node.domain not in allowed and node.domain not in self.local_domains:
                raise InvalidModel(f"node {node.name!r} uses operator domain {node.domain!r}, which is not allowed",
                                   [{"loc": ["graph", "node", node.name], "msg": "domain not in allow-list"}])
            for attr in node.attribute:
                label = f"{where} node {node.name!r} attribute {attr.name!r}"
                for tensor in _attribute_tensors(attr):
                    self._tensor(tensor, label)
                for sub in _attribute_graphs(attr):
                    self._graph(sub, depth + 1, label)

    def _elements(self, tensor: TensorProto, label: str) -> int:
        for dim in tensor.dims:
            if dim < 0:
                raise InvalidModel(f"{label} declares a negative dimension", [{"loc": ["tensor", tensor.name], "msg": "negative dim"}])
        count = math.prod(tensor.dims)
        if count > self.settings.max_tensor_elements:
            raise InvalidModel(f"{label} declares {count} elements, over the cap of {self.settings.max_tensor_elements}",
                               [{"loc": ["tensor", tensor.name], "msg": "too many elements"}])
        return count

    def _tensor(self, tensor: TensorProto, label: str) -> None:
        count = self._elements(tensor, label)
        if tensor.data_location == TensorProto.EXTERNAL:
            self._external(tensor, count, label)

    def _external(self, tensor: TensorProto, count: int, label: str) -> None:
        loc = ["tensor", tensor.name, "external_data"]
        entries: dict[str, str] = {}
        for entry in tensor.external_data:
            if entry.key not in EXTERNAL_DATA_KEYS:
                raise InvalidModel(f"{label}: unknown external-data key {entry.key!r}", [{"loc": loc, "msg": "unknown key"}])
            entries[entry.key] = entry.value
        location = entries.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts or "\\" in location or "\x00" in location:
            raise InvalidModel(f"{label}: external-data location {location!r} is not a plain relative path",
                               [{"loc": loc, "msg": "bad location"}])
        candidate = os.path.join(self.model_dir, location)
        resolved = os.path.realpath(candidate)
        if os.path.commonpath([self.model_dir, resolved]) != self.model_dir:
            raise InvalidModel(f"{label}: external-data location {location!r} leaves the model's directory",
                               [{"loc": loc, "msg": "location escapes"}])
        try:
            info = os.lstat(candidate)
        except OSError as exc:
            raise InvalidModel(f"{label}: external-data file {location!r} is not part of the upload: upload one "
                               ".zip holding the .onnx and its external-data files",
                               [{"loc": loc, "msg": "external file missing: upload a .zip holding the .onnx and "
                                                    "its external-data files"}]) from exc
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise InvalidModel(f"{label}: external-data file {location!r} is a link or not a regular file",
                               [{"loc": loc, "msg": "not a regular file"}])
        offset = _non_negative_int(entries.get("offset", "0"), label, loc, "offset")
        itemsize = _itemsize(tensor.data_type)
        expected = count * itemsize if itemsize else None
        length = _non_negative_int(entries["length"], label, loc, "length") if "length" in entries else None
        if length is None:
            length = info.st_size - offset
        if expected is not None and length != expected:
            raise InvalidModel(f"{label}: external-data length {length} disagrees with its dims ({expected} bytes)",
                               [{"loc": loc, "msg": "length mismatch"}])
        if offset + length > info.st_size:
            raise InvalidModel(f"{label}: external data runs past the end of {location!r}",
                               [{"loc": loc, "msg": "offset/length out of file"}])


def _non_negative_int(value: str, label: str, loc: list[Any], key: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise InvalidModel(f"{label}: external-data {key} {value!r} is not an integer", [{"loc": loc, "msg": f"bad {key}"}]) from exc
    if number < 0 or number >= 2**63:
        raise InvalidModel(f"{label}: external-data {key} {number} is out of range", [{"loc": loc, "msg": f"bad {key}"}])
    return number


def _itemsize(data_type: int) -> int | None:
    """Bytes per element of fixed-size dtypes; None for strings and sub-byte types."""
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError):
        return None
    if data_type in (TensorProto.STRING,) or np_dtype.itemsize == 0:
        return None
    if data_type in {getattr(TensorProto, n, -1) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}:
        return None
    return np_dtype.itemsize


def _attribute_tensors(attr: AttributeProto) -> Iterator[TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    for sparse in attr.sparse_tensors:
        yield sparse.values
        yield sparse.indices


def _attribute_graphs(attr: AttributeProto) -> Iterator[GraphProto]:
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    dtype: str | None
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else None
    except (KeyError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: list[int | str | None] | None = None
    if tensor_type.HasField("shape"):
        shape = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _describe(model: onnx.ModelProto, params: int) -> ModelInfo:
    initializers = {init.name for init in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelInfo(
        params=params,
        opset=opset,
        ir_version=model.ir_version,
        inputs=[_value_info(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_value_info(v) for v in model.graph.output],
    )
