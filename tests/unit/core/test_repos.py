"""core.repos: guarded job transitions, progress events, heartbeats (on SQLite)."""
from __future__ import annotations

import datetime as dt

import pytest

from core.db import session_scope
from core.errors import InvalidTransition, NotFound
from core.models import JobState
from core.repos import ArtifactRepo, JobRepo, ModelRepo, WorkerRepo


@pytest.fixture
def job_id(migrated) -> str:
    with session_scope() as session:
        model = ModelRepo(session).create(filename="m.onnx", sha256="0" * 64, bytes=10, params=1, opset=17,
                                          ir_version=8, inputs=[], outputs=[], storage_key="models/x/model.onnx")
        return JobRepo(session).create(model.id, {"steps": [{"op": "fp16"}]}, "cpu-x86").id


def _job(job_id):
    with session_scope() as session:
        return JobRepo(session).get(job_id)


def test_claim_once_then_second_delivery_gets_nothing(job_id):
    with session_scope() as session:
        assert JobRepo(session).claim(job_id, "w1")
    with session_scope() as session:
        assert not JobRepo(session).claim(job_id, "w2")
    job = _job(job_id)
    assert job.state == "running" and job.worker == "w1" and job.attempts == 1 and job.started_at is not None


def test_illegal_transitions_are_refused(job_id):
    with session_scope() as session:
        with pytest.raises(InvalidTransition, match="queued; it cannot become succeeded"):
            JobRepo(session).transition(job_id, JobState.SUCCEEDED)
    with session_scope() as session:
        JobRepo(session).claim(job_id, "w")
        JobRepo(session).transition(job_id, JobState.FAILED, error={"detail": "boom"})
    with session_scope() as session:
        with pytest.raises(InvalidTransition):
            JobRepo(session).transition(job_id, JobState.SUCCEEDED)
        with pytest.raises(InvalidTransition):
            JobRepo(session).transition(job_id, JobState.RUNNING)
    job = _job(job_id)
    assert job.state == "failed" and job.error == {"detail": "boom"} and job.finished_at is not None


def test_unknown_job_is_not_found(migrated):
    with session_scope() as session:
        with pytest.raises(NotFound):
            JobRepo(session).transition("nope", JobState.RUNNING)
        with pytest.raises(NotFound):
            JobRepo(session).get("nope")


def test_progress_only_while_running_and_events_per_stage(job_id):
    with session_scope() as session:
        assert not JobRepo(session).set_progress(job_id, 0.5, "step 1/1: fp16")
    with session_scope() as session:
        jobs = JobRepo(session)
        jobs.claim(job_id, "w")
        assert jobs.set_progress(job_id, 0.1, "step 1/1: fp16")
        assert jobs.set_progress(job_id, 0.2, "step 1/1: fp16")
        assert jobs.set_progress(job_id, 7.0, "measuring")
        jobs.transition(job_id, JobState.SUCCEEDED, progress=1.0, report={"size_ratio": 2.0})
    with session_scope() as session:
        events = [(e.kind, e.state, e.stage) for e in JobRepo(session).events(job_id)]
    assert events == [
        ("state", "queued", "queued"), ("state", "running", "running"), ("stage", "running", "step 1/1: fp16"),
        ("stage", "running", "measuring"), ("state", "succeeded", "succeeded"),
    ]
    job = _job(job_id)
    assert job.progress == 1.0 and job.report == {"size_ratio": 2.0}
    assert job.created_at.tzinfo is not None


def test_artifacts_are_unique_per_job_and_name(job_id):
    with session_scope() as session:
        ArtifactRepo(session).add(job_id, "model", "jobs/x/model.onnx", 1, "a" * 64, "application/octet-stream")
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with session_scope() as session:
            ArtifactRepo(session).add(job_id, "model", "jobs/x/model2.onnx", 1, "b" * 64, "application/octet-stream")


def test_heartbeats_go_stale(migrated):
    now = dt.datetime.now(dt.timezone.utc)
    with session_scope() as session:
        repo = WorkerRepo(session)
        repo.beat("w1", "gpu", 1, now=now - dt.timedelta(seconds=60))
        assert not repo.has_live_worker("gpu", 30, now=now)
        repo.beat("w1", "gpu", 1, now=now)
        assert repo.has_live_worker("gpu", 30, now=now)
        assert not repo.has_live_worker("cpu-arm", 30, now=now)
        repo.remove("w1", "gpu")
        assert not repo.has_live_worker("gpu", 30, now=now)
