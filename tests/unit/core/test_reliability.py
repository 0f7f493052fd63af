"""Attempts, leases, re-claim of a lost attempt, the attempt cap and the reaper (on SQLite)."""
from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys

import pytest

import worker.pipeline.runner as runner
from core import queue
from core.db import session_scope
from core.errors import InvalidTransition
from core.models import Job, JobState
from core.models.base import utcnow
from core.reaper import reap_lost_jobs
from core.repos import ArtifactRepo, JobRepo, ModelRepo
from core.repos.jobs import ClaimOutcome
from core.settings import get_settings
from tests.unit.core.stored_jobs import stored_job
from worker.tasks import execute_job, owner_alive, worker_identity

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


@pytest.fixture
def job_id(migrated, tmp_path, onnx_models) -> str:
    return stored_job(tmp_path, onnx_models.mlp(), RECIPE, "cpu-x86", max_attempts=2)


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return JobRepo(session).get(job_id)


def _age_lease(job_id: str, seconds: float) -> None:
    with session_scope() as session:
        session.query(Job).filter(Job.id == job_id).update(
            {Job.heartbeat_at: utcnow() - dt.timedelta(seconds=seconds)})


def _claim(job_id: str, worker: str, stale_seconds: float = 30, alive=lambda owner: True):
    with session_scope() as session:
        return JobRepo(session).claim(job_id, worker, stale_before=utcnow() - dt.timedelta(seconds=stale_seconds),
                                      owner_alive=alive)


def test_live_attempt_is_not_claimed_twice(job_id):
    assert _claim(job_id, "w1").outcome is ClaimOutcome.CLAIMED
    second = _claim(job_id, "w2")
    assert second.outcome is ClaimOutcome.BUSY and not second
    assert _job(job_id).attempts == 1 and _job(job_id).worker == "w1"


def test_lost_attempt_is_reclaimed_then_the_cap_fails_the_job(job_id):
    assert _claim(job_id, "w1").attempt == 1
    _age_lease(job_id, 60)
    again = _claim(job_id, "w2")
    assert again.outcome is ClaimOutcome.CLAIMED and again.attempt == 2
    assert _job(job_id).worker == "w2" and _job(job_id).state == "running"
    _age_lease(job_id, 60)
    last = _claim(job_id, "w3")
    assert last.outcome is ClaimOutcome.EXHAUSTED
    job = _job(job_id)
    assert job.state == "failed" and job.attempts == 2
    assert job.error["type"].endswith("/worker-lost") and "2 attempt" in job.error["detail"]


def test_owner_process_gone_is_reclaimed_without_waiting_for_the_lease(job_id):
    _claim(job_id, "w1")
    assert _claim(job_id, "w2", alive=lambda owner: owner != "w1").attempt == 2


def test_an_old_attempt_cannot_record_success_or_failure(job_id):
    _claim(job_id, "w1")
    _age_lease(job_id, 60)
    _claim(job_id, "w2")
    with session_scope() as session, pytest.raises(InvalidTransition, match="attempt 2, not 1"):
        JobRepo(session).transition(job_id, JobState.SUCCEEDED, expected_attempt=1)
    with session_scope() as session:
        JobRepo(session).transition(job_id, JobState.SUCCEEDED, expected_attempt=2)
    assert _job(job_id).state == "succeeded"


def test_lease_renews_only_for_the_current_attempt(job_id):
    _claim(job_id, "w1")
    _age_lease(job_id, 60)
    with session_scope() as session:
        assert JobRepo(session).renew_lease(job_id, 1)
        assert not JobRepo(session).renew_lease(job_id, 2)
    assert _job(job_id).heartbeat_at > utcnow() - dt.timedelta(seconds=10)


def test_owner_alive_checks_processes_on_this_machine_only():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = socket.gethostname()
    assert owner_alive(f"{me}:{os.getpid()}:w") and owner_alive(worker_identity("w"))
    assert not owner_alive(f"{me}:{child.pid}:w")
    assert owner_alive(f"another-machine:{child.pid}:w") and owner_alive("w1")


def test_reaper_requeues_a_lost_job_and_enqueues_it(job_id, monkeypatch):
    sent = []
    monkeypatch.setattr(queue, "enqueue", lambda job, target: sent.append((job, target)))
    _claim(job_id, "w1")
    assert reap_lost_jobs() == []  # lease fresh
    _age_lease(job_id, get_settings().worker_stale_seconds + 5)
    reaped = reap_lost_jobs()
    assert [(r.job_id, r.action) for r in reaped] == [(job_id, "requeued")]
    assert sent == [(job_id, "cpu-x86")]
    job = _job(job_id)
    assert job.state == "queued" and job.stage == "requeued: worker lost" and job.attempts == 1
    assert _claim(job_id, "w2").attempt == 2


def test_reaper_fails_a_lost_job_past_the_cap_and_one_past_the_hard_limit(job_id, migrated, monkeypatch):
    monkeypatch.setattr(queue, "enqueue", lambda job, target: pytest.fail("must not requeue"))
    _claim(job_id, "w1")
    _age_lease(job_id, 60)
    _claim(job_id, "w2")
    _age_lease(job_id, 60)
    assert [r.action for r in reap_lost_jobs()] == ["failed"]
    assert _job(job_id).error["type"].endswith("/worker-lost")

    with session_scope() as session:
        other = JobRepo(session).create("m1", RECIPE, "cpu-x86").id
    _claim(other, "w1")
    settings = get_settings()
    with session_scope() as session:  # lease fresh, but started longer ago than the hard limit
        session.query(Job).filter(Job.id == other).update(
            {Job.started_at: utcnow() - dt.timedelta(seconds=settings.task_hard_time_limit + 2 * settings.worker_stale_seconds)})
    assert [(r.job_id, r.action) for r in reap_lost_jobs()] == [(other, "failed")]
    assert _job(other).error["type"].endswith("/time-limit")


def test_broker_down_leaves_the_job_for_the_next_round(job_id, monkeypatch):
    from core.errors import Unavailable

    def refuse(job, target):
        raise Unavailable("broker down")

    monkeypatch.setattr(queue, "enqueue", refuse)
    _claim(job_id, "w1")
    _age_lease(job_id, 60)
    assert reap_lost_jobs() == []
    assert _job(job_id).state == "running"


def test_only_the_owning_attempt_commits_artifacts(job_id, migrated, monkeypatch):
    """Attempt 1 is presumed lost and taken over while it still runs: its result is discarded."""

    def fake_run(model_path, recipe, *, workdir, **_):
        _age_lease(job_id, 60)
        assert _claim(job_id, "other").attempt == 2  # taken over mid-run
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"m")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "running"
    with session_scope() as session:
        assert ArtifactRepo(session).list_for_job(job_id) == []
    root = migrated / "artifacts" / "jobs"
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_reaper_enqueues_a_job_whose_submit_request_died(migrated, monkeypatch):
    sent = []
    monkeypatch.setattr(queue, "enqueue", lambda job, target: sent.append(job))
    with session_scope() as session:
        model = ModelRepo(session).create(filename="m.onnx", sha256="0" * 64, bytes=1, params=1, opset=17, ir_version=8,
                                          inputs=[], outputs=[], storage_key="models/x/model.onnx")
        fresh = JobRepo(session).create(model.id, RECIPE, "cpu-x86", stage="submitting").id
        old = JobRepo(session).create(model.id, RECIPE, "cpu-x86", stage="submitting").id
        session.query(Job).filter(Job.id == old).update({Job.created_at: utcnow() - dt.timedelta(minutes=5)})
    assert [(r.job_id, r.action) for r in reap_lost_jobs()] == [(old, "enqueued")]
    assert sent == [old] and _job(old).stage == "queued" and _job(fresh).stage == "submitting"


def test_pool_process_limits_cap_memory_and_cpu(tmp_path):
    """apply_job_limits in a child process: a 512 MiB cap makes a 1 GiB allocation fail there."""
    code = (
        "import numpy as np\n"
        "from core.settings import Settings\n"
        "from worker.celery_app import apply_job_limits\n"
        "print(apply_job_limits(Settings(worker_max_memory_bytes=512 * 1024**2, worker_max_cpu_seconds=120)))\n"
        "try:\n"
        "    np.ones(1024**3 // 8)\n"
        "except MemoryError:\n"
        "    print('refused')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FEATHERWEIGHT_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "'memory_bytes': 536870912" in result.stdout and "'cpu_seconds': 120" in result.stdout
    assert result.stdout.strip().endswith("refused")


def _age_queued(job_id: str, seconds: float) -> None:
    with session_scope() as session:
        session.query(Job).filter(Job.id == job_id).update({Job.updated_at: utcnow() - dt.timedelta(seconds=seconds)})


def test_reaper_sends_again_a_queued_job_whose_message_was_lost(job_id):
    """On the real embedded broker: the job's message is gone (never sent here), so its queue is empty."""
    resend_after = get_settings().queued_resend_seconds
    _age_queued(job_id, resend_after - 30)
    assert reap_lost_jobs() == [] and queue.waiting_messages("cpu-x86") == 0   # not waiting long enough yet
    _age_queued(job_id, resend_after + 5)
    assert [(r.job_id, r.action) for r in reap_lost_jobs()] == [(job_id, "resent")]
    assert queue.waiting_messages("cpu-x86") == 1
    with session_scope() as session:
        assert "its message was lost, sent again" in JobRepo(session).events(job_id)[-1].message
    assert reap_lost_jobs() == []                              # sent just now: not again
    _age_queued(job_id, resend_after + 5)
    assert reap_lost_jobs() == [] and queue.waiting_messages("cpu-x86") == 1   # a message waits: a backlog
    assert _claim(job_id, "w1").outcome is ClaimOutcome.CLAIMED


def test_a_backlog_on_another_target_does_not_hide_a_lost_message(job_id):
    with session_scope() as session:
        arm = JobRepo(session).create("m1", RECIPE, "cpu-arm").id
    queue.enqueue(arm, "cpu-arm")                              # waits for an ARM worker: not lost
    for job in (job_id, arm):
        _age_queued(job, get_settings().queued_resend_seconds + 5)
    assert [(r.job_id, r.action) for r in reap_lost_jobs()] == [(job_id, "resent")]
    assert queue.waiting_messages("cpu-arm") == 1


def test_reaper_leaves_lost_messages_for_the_next_round_while_the_broker_is_down(job_id, monkeypatch):
    from core.errors import Unavailable

    def down(target):
        raise Unavailable("broker down")

    monkeypatch.setattr(queue, "waiting_messages", down)
    _age_queued(job_id, get_settings().queued_resend_seconds + 5)
    assert reap_lost_jobs() == []
    assert _job(job_id).state == "queued"
