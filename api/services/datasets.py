"""Uploading, listing and deleting data sets (.npz) — an upload that fails leaves nothing behind.

Like a model upload: streamed to a per-upload scratch directory with a byte cap, checked by
``core.npz_guard`` (no pickles, no zip bombs, numbers only, finite), stored, then recorded; the
object is deleted again if the row cannot be written.
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
from core import npz_guard
from core.errors import Conflict
from core.models import Dataset
from core.models.base import new_id
from core.repos import DatasetRepo, JobRepo
from core.repos.paging import Page
from core.settings import Settings
from core.storage import ObjectStore


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/data.npz"


async def upload_dataset(request: Request, session: Session, store: ObjectStore, settings: Settings,
                       tenant: str) -> Dataset:
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.scratch_dir))
    try:
        received = await receive_file(
            request, scratch / "data.npz", field="file", max_bytes=settings.max_upload_bytes,
            max_parts=settings.max_multipart_fields, max_field_bytes=settings.max_multipart_field_bytes,
            idle_timeout=settings.upload_idle_timeout_seconds,
        )
        return await run_in_threadpool(_register, received, session, store, settings, tenant)
    finally:
        await run_in_threadpool(shutil.rmtree, scratch, True)


def _register(received: ReceivedFile, session: Session, store: ObjectStore, settings: Settings,
              tenant: str) -> Dataset:
    arrays = npz_guard.validate_npz(received.path, settings)
    dataset_id = new_id()
    key = dataset_key(dataset_id)
    store.put_file(key, received.path, "application/octet-stream")
    try:
        dataset = DatasetRepo(session).create(
            id=dataset_id, tenant_id=tenant, filename=received.filename or "data.npz", sha256=received.sha256, bytes=received.size,
            arrays=arrays, storage_key=key,
        )
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    metrics.count_upload("dataset", received.size)
    return dataset


def get_dataset(session: Session, dataset_id: str, tenant: str) -> Dataset:
    return DatasetRepo(session).get(dataset_id, tenant)


def list_datasets(session: Session, tenant: str, limit: int, cursor: str | None) -> Page[Dataset]:
    return DatasetRepo(session).list(tenant, limit, cursor)


def delete_dataset(session: Session, store: ObjectStore, dataset_id: str, tenant: str) -> None:
    """Hide the data set and delete its object; 409 while a queued or running job uses it."""
    datasets = DatasetRepo(session)
    dataset = datasets.get(dataset_id, tenant)
    if JobRepo(session).active_users(dataset_id=dataset_id):
        raise Conflict(f"data set {dataset_id!r} is used by a queued or running job")
    if datasets.mark_deleted(dataset_id):
        session.commit()
        store.delete(dataset.storage_key)
