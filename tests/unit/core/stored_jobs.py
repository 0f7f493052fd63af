"""One job row on a stored model, for the worker tests that run execute_job on it."""
from __future__ import annotations

from pathlib import Path

import onnx

from core.db import session_scope
from core.repos import JobRepo, ModelRepo
from core.storage import get_store


def stored_job(tmp_path: Path, model: onnx.ModelProto, recipe: dict, target: str, **fields) -> str:
    """Store ``model`` as model m1 and create a job on it for ``target``; its id."""
    source = tmp_path / "upload.onnx"
    source.write_bytes(model.SerializeToString())
    get_store().put_file("models/m1/model.onnx", source)
    with session_scope() as session:
        row = ModelRepo(session).create(id="m1", filename="m.onnx", sha256="0" * 64, bytes=1, params=1, opset=17,
                                        ir_version=8, inputs=[], outputs=[], storage_key="models/m1/model.onnx")
        return JobRepo(session).create(row.id, recipe, target, **fields).id
