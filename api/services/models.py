"""Uploading a model: stream to a scratch file, validate, store, record — or leave nothing behind.

An .onnx is stored as ``models/<id>/model.onnx``; a .zip (one .onnx and its external-data files,
core.model_archive) is unpacked in the scratch directory, validated there, and stored whole as
``models/<id>/model.zip`` for the worker to unpack the same way.

The scratch directory is created per upload and always removed. The object is stored only after
``onnx_guard.validate`` accepts the file, and deleted again if the database row cannot be written,
so no failure leaves an object without a row or a row without an object.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.multipart import ReceivedFile, receive_file
from api.services import metrics
from core import isolation, model_archive
from core.models import Model
from core.errors import Conflict
from core.models.base import new_id
from core.repos import JobRepo, ModelRepo
from core.repos.paging import Page
from core.settings import Settings
from core.storage import ObjectStore


def model_key(model_id: str, archive: bool = False) -> str:
    return f"models/{model_id}/model.zip" if archive else f"models/{model_id}/model.onnx"


async def upload_model(request: Request, session: Session, store: ObjectStore, settings: Settings,
                       tenant: str) -> Model:
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.scratch_dir))
    try:
        received = await receive_file(
            request, scratch / "upload.bin", field="file", max_bytes=settings.max_upload_bytes,
            max_parts=settings.max_multipart_fields, max_field_bytes=settings.max_multipart_field_bytes,
            idle_timeout=settings.upload_idle_timeout_seconds,
        )
        return await run_in_threadpool(_register, received, session, store, settings, tenant)
    finally:
        await run_in_threadpool(shutil.rmtree, scratch, True)


def _register(received: ReceivedFile, session: Session, store: ObjectStore, settings: Settings,
              tenant: str) -> Model:
    archive = model_archive.is_zip(received.path)
    model_path = (model_archive.unpack_model_archive(received.path, received.path.parent / "unpacked", settings)
                  if archive else received.path)
    info = isolation.validate_model(model_path, settings)
    model_id = new_id()
    key = model_key(model_id, archive)
    store.put_file(key, received.path, "application/octet-stream")
    try:
        model = ModelRepo(session).create(
            id=model_id, tenant_id=tenant, filename=received.filename or "model.onnx", sha256=received.sha256, bytes=received.size,
            params=info.params, opset=info.opset, ir_version=info.ir_version, inputs=info.inputs,
            outputs=info.outputs, storage_key=key,
        )
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    metrics.count_upload("model", received.size)
    return model


def get_model(session: Session, model_id: str, tenant: str) -> Model:
    return ModelRepo(session).get(model_id, tenant)


def list_models(session: Session, tenant: str, limit: int, cursor: str | None) -> Page[Model]:
    return ModelRepo(session).list(tenant, limit, cursor)


def delete_model(session: Session, store: ObjectStore, model_id: str, tenant: str) -> None:
    """Hide the model and delete its bytes (finished jobs keep their row and artifacts); 409 while a
    queued or running job uses it."""
    models = ModelRepo(session)
    model = models.get(model_id, tenant)
    if JobRepo(session).active_users(model_id=model_id):
        raise Conflict(f"model {model_id!r} is used by a queued or running job")
    if models.mark_deleted(model_id):
        session.commit()
        store.delete(model.storage_key)
