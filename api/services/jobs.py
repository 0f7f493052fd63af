"""Submitting a job, reading its status, and streaming its artifacts.

Submission validates the recipe (core.recipe), the model and data set references and the preflight
checks (core.preflight: calibration present, data sets fit the inputs, ...) before anything is
written, commits the job row, then enqueues its id on the target's queue; if the broker refuses, the row is
deleted again and the client gets 503, so no job exists that no worker will ever see.
A queued job whose queue has no live worker heartbeat says so in its ``stage``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.schemas.jobs import ArtifactPublic, JobCreate, JobEventPublic, JobPublic
from core import preflight, queue, webhooks
from core.errors import Conflict, InvalidInput, InvalidTransition, NotFound, RecipeError, Unavailable
from core.models import Job, JobState
from core.recipe import parse_recipe, recipe_to_json
from core.repos import ArtifactRepo, DatasetRepo, JobRepo, ModelRepo, WorkerRepo
from core.repos.paging import Page
from core.settings import Settings
from core.storage import ObjectStore

# Public artifact names; "model.onnx" is accepted as another name for "model".
ARTIFACT_ALIASES = {"model.onnx": "model"}
ARTIFACT_FILENAMES = {"model": "model.onnx", **{f"candidate-{i}": f"candidate-{i}.onnx" for i in (1, 2, 3)}}


SUBMITTING = "submitting"


def waiting_stage(queue_name: str) -> str:
    return f"waiting: no live worker on queue {queue_name!r}"


def request_digest(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def submit_job(session: Session, body: JobCreate, settings: Settings, tenant: str,
               idempotency_key: str | None = None) -> JobPublic:
    """Check, record and enqueue a job. With ``idempotency_key``: the same key and body give the job
    created first; a different body is 422; a first request still being submitted is 409."""
    digest = request_digest(body)
    jobs = JobRepo(session)
    if idempotency_key is not None:
        existing = jobs.find_by_idempotency_key(tenant, idempotency_key)
        if existing is not None:
            return _replay(session, existing, digest, settings)
    try:
        recipe = parse_recipe(body.recipe)
    except RecipeError as exc:
        raise RecipeError(exc.detail, [{**e, "loc": ["body", "recipe", *e.get("loc", [])]} for e in exc.errors]) from None
    models = ModelRepo(session)
    model = models.find(body.model_id, tenant)
    if model is None:
        raise InvalidInput(f"model {body.model_id!r} does not exist",
                           [{"loc": ["body", "model_id"], "msg": "no such model"}])
    calibration = _dataset_arrays(session, body.calibration_dataset_id, "calibration_dataset_id", tenant)
    evaluation = _dataset_arrays(session, body.eval_dataset_id, "eval_dataset_id", tenant)
    preflight.check_job(recipe, model, calibration=calibration, evaluation=evaluation,
                        model_exists=lambda model_id: models.find(model_id, tenant) is not None)
    if body.webhook_url is not None:
        webhooks.check_url(body.webhook_url, settings)
    target = body.target.value
    if jobs.queued_by_target().get(target, 0) >= settings.max_queued_jobs:
        raise Unavailable(f"queue {target!r} holds {settings.max_queued_jobs} jobs already; retry later")
    try:
        job = jobs.create(model_id=body.model_id, recipe=json.loads(recipe_to_json(recipe)), target=target,
                          max_attempts=settings.job_max_attempts, calibration_dataset_id=body.calibration_dataset_id,
                          eval_dataset_id=body.eval_dataset_id, tenant_id=tenant, webhook_url=body.webhook_url,
                          allow_target_mismatch=body.allow_target_mismatch,
                          idempotency_key=idempotency_key, request_sha256=digest, stage=SUBMITTING)
        session.commit()
    except IntegrityError:
        session.rollback()  # a concurrent request with the same key got there first
        existing = jobs.find_by_idempotency_key(tenant, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(session, existing, digest, settings)
    try:
        queue.enqueue(job.id, target)
    except Unavailable:
        jobs.delete(job.id)
        session.commit()
        raise
    jobs.mark_submitted(job.id)
    session.commit()
    session.expire_all()
    return job_view(session, jobs.get(job.id), settings)


def _replay(session: Session, job: Job, digest: str, settings: Settings) -> JobPublic:
    loc = [{"loc": ["header", "Idempotency-Key"], "msg": "already used"}]
    if job.request_sha256 != digest:
        raise InvalidInput("this Idempotency-Key was used with a different request body", loc)
    if job.state == JobState.QUEUED.value and job.stage == SUBMITTING:
        raise Conflict("the first request with this Idempotency-Key is still being processed; retry shortly", loc)
    return job_view(session, job, settings)


def _dataset_arrays(session: Session, dataset_id: str | None, field: str, tenant: str) -> list[dict] | None:
    if dataset_id is None:
        return None
    dataset = DatasetRepo(session).find(dataset_id, tenant)
    if dataset is None:
        raise InvalidInput(f"data set {dataset_id!r} does not exist", [{"loc": ["body", field], "msg": "no such data set"}])
    return dataset.arrays


def poll_headers(job: JobPublic) -> dict[str, str]:
    """ETag (a digest of the representation) and, while the job is not finished, Retry-After."""
    headers = {"ETag": f'"{hashlib.sha256(job.model_dump_json().encode()).hexdigest()[:32]}"'}
    if job.state in (JobState.QUEUED.value, JobState.RUNNING.value):
        headers["Retry-After"] = "2"
    return headers


def get_job(session: Session, job_id: str, settings: Settings, tenant: str) -> JobPublic:
    return job_view(session, JobRepo(session).get(job_id, tenant), settings)


def list_jobs(session: Session, settings: Settings, tenant: str, limit: int, cursor: str | None,
              state: str | None) -> tuple[list[JobPublic], str | None]:
    page: Page[Job] = JobRepo(session).list(tenant, limit, cursor, state)
    return [job_view(session, job, settings) for job in page.items], page.next_cursor


def job_events(session: Session, job_id: str, tenant: str) -> list[JobEventPublic]:
    jobs = JobRepo(session)
    jobs.get(job_id, tenant)
    return [JobEventPublic.model_validate(event) for event in jobs.events(job_id)]


def cancel_job(session: Session, job_id: str, settings: Settings, tenant: str) -> JobPublic:
    """queued or running -> cancelled at once; a running attempt sees it at its next cancel check
    (every few seconds, between chunks of work), stops and deletes what it uploaded. 409 when finished."""
    jobs = JobRepo(session)
    jobs.get(job_id, tenant)
    try:
        jobs.transition(job_id, JobState.CANCELLED, message="cancelled by the client")
    except InvalidTransition as exc:
        session.rollback()
        raise Conflict(f"job {job_id!r} already finished; it cannot be cancelled") from exc
    session.commit()
    session.expire_all()
    return job_view(session, jobs.get(job_id), settings)


def delete_job(session: Session, store: ObjectStore, job_id: str, tenant: str) -> None:
    """Delete a finished job, its events, artifact rows and objects; 409 while queued or running."""
    jobs = JobRepo(session)
    jobs.get(job_id, tenant)
    keys = [a.storage_key for a in ArtifactRepo(session).list_for_job(job_id)]
    if not jobs.delete_finished(job_id):
        raise Conflict(f"job {job_id!r} is queued or running; cancel it first")
    session.commit()
    for key in keys:
        store.delete(key)


def job_view(session: Session, job: Job, settings: Settings) -> JobPublic:
    stage = job.stage
    if job.state == JobState.QUEUED.value and stage != SUBMITTING:
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
        target=job.target, allow_target_mismatch=bool(job.allow_target_mismatch), recipe=job.recipe, report=job.report, artifacts=artifacts, attempts=job.attempts,
        max_attempts=job.max_attempts, calibration_dataset_id=job.calibration_dataset_id,
        eval_dataset_id=job.eval_dataset_id, webhook_url=job.webhook_url, webhook_state=job.webhook_state,
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
    )


@dataclass(frozen=True)
class ArtifactStream:
    chunks: Iterator[bytes]
    filename: str
    content_type: str
    size: int
    sha256: str


def open_artifact(session: Session, store: ObjectStore, job_id: str, name: str, tenant: str) -> ArtifactStream:
    JobRepo(session).get(job_id, tenant)
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
