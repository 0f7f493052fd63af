"""core.onnx_guard: what an uploaded model may and may not contain."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import InvalidModel
from core.onnx_guard import validate
from core.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home")


def _save(model: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(model.SerializeToString())
    return path


def _external(model: onnx.ModelProto, tensor_name: str, **entries: str) -> onnx.ModelProto:
    """Point ``tensor_name`` at external data described by ``entries`` (raw data removed)."""
    for init in model.graph.initializer:
        if init.name == tensor_name:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in entries.items():
                init.external_data.add(key=key, value=value)
            return model
    raise KeyError(tensor_name)


def test_valid_model_is_described(tmp_path, settings, onnx_models):
    info = validate(_save(onnx_models.cnn(), tmp_path), settings)
    assert info.opset == 17 and info.ir_version == 8
    assert info.params == 16 * 27 + 16 + 32 * 16 * 9 + 32 + 320 + 10
    assert info.inputs == [{"name": "image", "dtype": "float32", "shape": [1, 3, 16, 16]}]


def test_external_data_inside_the_directory_is_accepted(tmp_path, settings, onnx_models):
    model = onnx_models.dynamic_batch()
    weights = numpy_helper.to_array(model.graph.initializer[0])
    (tmp_path / "weights.bin").write_bytes(weights.tobytes())
    _external(model, "w1", location="weights.bin", offset="0", length=str(weights.nbytes))
    info = validate(_save(model, tmp_path), settings)
    assert info.params == 32 * 64 + 64 * 8


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"location": "../secret.bin"}, "not a plain relative path"),
        ({"location": "/etc/passwd"}, "not a plain relative path"),
        ({"location": "sub\\..\\..\\x"}, "not a plain relative path"),
        ({"location": "missing.bin"}, "not part of the upload"),
        ({"location": "weights.bin", "offset": "-1"}, "out of range"),
        ({"location": "weights.bin", "offset": "0", "length": "99999999999999999999999"}, "out of range"),
        ({"location": "weights.bin", "length": "12"}, "disagrees with its dims"),
        ({"location": "weights.bin", "offset": "8", "length": str(32 * 64 * 4)}, "runs past the end"),
        ({"location": "weights.bin", "owner": "root"}, "unknown external-data key"),
        ({"location": "weights.bin", "offset": "zero"}, "not an integer"),
    ],
)
def test_bad_external_data_is_refused(tmp_path, settings, onnx_models, entries, message):
    model = onnx_models.dynamic_batch()
    (tmp_path / "weights.bin").write_bytes(bytes(32 * 64 * 4))
    _external(model, "w1", **entries)
    with pytest.raises(InvalidModel, match=message):
        validate(_save(model, tmp_path), settings)


def test_symlinked_external_data_is_refused(tmp_path, settings, onnx_models):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(32 * 64 * 4))
    model_dir = tmp_path / "upload"
    model_dir.mkdir()
    (model_dir / "weights.bin").symlink_to(outside)
    model = _external(onnx_models.dynamic_batch(), "w1", location="weights.bin")
    with pytest.raises(InvalidModel, match="leaves the model's directory|link or not a regular file"):
        validate(_save(model, model_dir), settings)


def test_hardlinked_external_data_is_refused(tmp_path, settings, onnx_models):
    model_dir = tmp_path / "upload"
    model_dir.mkdir()
    original = tmp_path / "elsewhere.bin"
    original.write_bytes(bytes(32 * 64 * 4))
    os.link(original, model_dir / "weights.bin")
    model = _external(onnx_models.dynamic_batch(), "w1", location="weights.bin")
    with pytest.raises(InvalidModel, match="link or not a regular file"):
        validate(_save(model, model_dir), settings)


def test_external_data_hidden_in_a_subgraph_constant_is_checked(tmp_path, settings):
    tensor = helper.make_tensor("c", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/shadow")
    branch = helper.make_graph([helper.make_node("Constant", [], ["y_then"], value=tensor)], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Constant", [], ["y_else"], value=helper.make_tensor(
        "d", TensorProto.FLOAT, [4], [1.0] * 4))], "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModel, match="not a plain relative path"):
        validate(_save(model, tmp_path), settings)


def test_deep_subgraph_nesting_is_refused(tmp_path):
    settings = Settings(home=tmp_path / "h", max_graph_depth=3)
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "g0", [], [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1])])
    for level in range(1, 5):
        inner = helper.make_graph(
            [helper.make_node("If", ["cond"], [f"y{level}"], then_branch=inner, else_branch=inner)], f"g{level}", [],
            [helper.make_tensor_value_info(f"y{level}", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(list(inner.node), "top", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                                         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              list(inner.output))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModel, match="nest deeper"):
        validate(_save(model, tmp_path), settings)


def test_tensor_dims_over_the_cap_are_refused(tmp_path, onnx_models):
    settings = Settings(home=tmp_path / "h", max_tensor_elements=1000)
    with pytest.raises(InvalidModel, match="over the cap"):
        validate(_save(onnx_models.dynamic_batch(), tmp_path), settings)


def test_overflowing_declared_dims_are_refused_without_allocating(tmp_path, settings, onnx_models):
    model = onnx_models.dynamic_batch()
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    del init.dims[:]
    init.dims.extend([2**40, 2**40])
    with pytest.raises(InvalidModel, match="over the cap"):
        validate(_save(model, tmp_path), settings)


def test_custom_domain_in_opset_import_is_refused(tmp_path, settings, onnx_models):
    model = onnx_models.mlp()
    model.opset_import.append(helper.make_opsetid("ai.custom.lib", 1))
    with pytest.raises(InvalidModel, match="ai.custom.lib"):
        validate(_save(model, tmp_path), settings)


def test_checker_failure_is_invalid_model(tmp_path, settings, onnx_models):
    model = onnx_models.mlp()
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(InvalidModel, match="checker"):
        validate(_save(model, tmp_path), settings)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10, np.random.default_rng(3).bytes(1000)])
def test_non_onnx_bytes_are_invalid_model(tmp_path, settings, payload):
    path = tmp_path / "m.onnx"
    path.write_bytes(payload)
    with pytest.raises(InvalidModel):
        validate(path, settings)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_protobuf_nesting_past_the_parser_limit_is_invalid_model(tmp_path, settings):
    # Hand-encoded, because onnx.helper itself cannot build it: 200 If nodes, each holding the next
    # graph in its then_branch (GraphProto.node=1, NodeProto.op_type=4 / attribute=5,
    # AttributeProto.name=1 / g=6, ModelProto.ir_version=1 / graph=7).
    graph = b""
    for _ in range(200):
        attribute = _field(1, b"then_branch") + _field(6, graph)
        graph = _field(1, _field(4, b"If") + _field(5, attribute))
    path = tmp_path / "deep.onnx"
    path.write_bytes(_varint(1 << 3) + _varint(8) + _field(7, graph))
    with pytest.raises(InvalidModel, match="does not parse"):
        validate(path, settings)
