"""Submitting a job, reading its status, and streaming its artifacts.

Submission validates the recipe (core.recipe) and the model reference before anything is written,
commits the job row, then enqueues its id on the target's queue; if the broker refuses, the row is
deleted again and the client gets 503, so no job exists that no worker will ever see.
A queued job whose queue has no live worker heartbeat says so in its ``stage``.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.orm import Session

from api.schemas.jobs import ArtifactPublic, JobCreate, JobPublic
from core import queue
from core.errors import InvalidInput, NotFound, RecipeError, Unavailable
from core.models import Job, JobState
from core.recipe import parse_recipe, recipe_to_json
from core.repos import ArtifactRepo, JobRepo, ModelRepo, WorkerRepo
from core.settings import Settings
from core.storage import ObjectStore

# Public artifact names; "model.onnx" is accepted as another name for "model".
ARTIFACT_ALIASES = {"model.onnx": "model"}
ARTIFACT_FILENAMES = {"model": "model.onnx"}


def waiting_stage(queue_name: str) -> str:
    return f"waiting: no live worker on queue {queue_name!r}"


def submit_job(session: Session, body: JobCreate, settings: Settings) -> JobPublic:
    try:
        recipe = parse_recipe(body.recipe)
    except RecipeError as exc:
        raise RecipeError(exc.detail, [{**e, "loc": ["body", "recipe", *e.get("loc", [])]} for e in exc.errors]) from None
    if ModelRepo(session).find(body.model_id) is None:
        raise InvalidInput(f"model {body.model_id!r} does not exist",
                           [{"loc": ["body", "model_id"], "msg": "no such model"}])
    target = body.target.value
    jobs = JobRepo(session)
    job = jobs.create(model_id=body.model_id, recipe=json.loads(recipe_to_json(recipe)), target=target)
    session.commit()
    try:
        queue.enqueue(job.id, target)
    except Unavailable:
        jobs.delete(job.id)
        session.commit()
        raise
    return job_view(session, job, settings)


def get_job(session: Session, job_id: str, settings: Settings) -> JobPublic:
    return job_view(session, JobRepo(session).get(job_id), settings)


def job_view(session: Session, job: Job, settings: Settings) -> JobPublic:
    stage = job.stage
    if job.state == JobState.QUEUED.value:
        queue_name = queue.queue_for(job.target)
        if not WorkerRepo(session).has_live_worker(queue_name, settings.worker_stale_seconds):
            stage = waiting_stage(queue_name)
    artifacts = [
        ArtifactPublic(name=a.name, bytes=a.bytes, sha256=a.sha256, content_type=a.content_type,
                       url=f"/v1/jobs/{job.id}/artifacts/{a.name}")
        for a in ArtifactRepo(session).list_for_job(job.id)
    ]
    return JobPublic(
        id=job.id, model_id=job.model_id, state=job.state, progress=job.progress, stage=stage, error=job.error,
        target=job.target, recipe=job.recipe, report=job.report, artifacts=artifacts, attempts=job.attempts,
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
    )


@dataclass(frozen=True)
class ArtifactStream:
    chunks: Iterator[bytes]
    filename: str
    content_type: str
    size: int
    sha256: str


def open_artifact(session: Session, store: ObjectStore, job_id: str, name: str) -> ArtifactStream:
    JobRepo(session).get(job_id)
    name = ARTIFACT_ALIASES.get(name, name)
    artifact = ArtifactRepo(session).get(job_id, name)
    try:
        chunks = store.iter_bytes(artifact.storage_key)
    except NotFound as exc:
        raise Unavailable(f"artifact {name!r} of job {job_id!r} is missing from storage") from exc
    return ArtifactStream(
        chunks=chunks, filename=ARTIFACT_FILENAMES.get(name, name), content_type=artifact.content_type,
        size=artifact.bytes, sha256=artifact.sha256,
    )
