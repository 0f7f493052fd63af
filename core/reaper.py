"""The reaper: finds jobs left ``running`` by a worker that is gone, and requeues or fails them.

Each worker runs ``reap_lost_jobs`` every ``reaper_interval_seconds`` (worker.celery_app). A running
job is lost when its lease (``jobs.heartbeat_at``, renewed by the attempt every
``worker_heartbeat_seconds``) is older than ``worker_stale_seconds``, or when it started longer ago
than the hard time limit plus that staleness. Then:

- started longer ago than the hard time limit: ``failed`` (a job that hit the limit is not retried forever);
- attempts used up (``attempts >= max_attempts``): ``failed``, naming the lost worker;
- otherwise: a new message is enqueued first, then the job moves running -> queued, guarded on the
  attempt it was seen with and on the lease still being stale. If the message is consumed before
  that move, the consumer re-claims the stale job itself; if the move loses a race, the extra
  message finds the job claimed or finished and is dropped. Either way one attempt runs.

A queued job still marked ``submitting`` a minute after it was created belongs to a submit request
that died between recording the job and enqueueing it: the reaper enqueues it (a duplicate message,
if the request did send one, finds the job claimed and is dropped).

A queued job whose target's queue has held no message at all for ``queued_resend_seconds`` since it
was queued (or last sent) lost its message: a broker restarted without persistence, or a message
that could not be read. The reaper sends it again and records that in the job's history. A queue
that still holds messages is left alone, so a backlog never gets duplicates; a message a worker had
just taken makes at worst one duplicate, which finds the job claimed and is dropped.

Several workers may reap at once: every write is a guarded UPDATE, so each job is handled once.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from core import queue
from core.db import session_scope
from core.errors import FeatherweightError, InvalidTransition
from core.models import Job, JobState
from core.models.base import utcnow
from core.repos import JobRepo
from core.settings import Settings, get_settings

log = logging.getLogger("featherweight.reaper")
PROBLEM_WORKER_LOST = "https://featherweight.dev/problems/worker-lost"
PROBLEM_TIME_LIMIT = "https://featherweight.dev/problems/time-limit"
SUBMIT_GRACE = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Reaped:
    job_id: str
    action: str  # "requeued" | "failed" | "enqueued" | "resent"
    reason: str


def reap_lost_jobs(settings: Settings | None = None, now: dt.datetime | None = None) -> list[Reaped]:
    settings = settings or get_settings()
    now = now or utcnow()
    stale_before = now - dt.timedelta(seconds=settings.worker_stale_seconds)
    started_before = now - dt.timedelta(seconds=settings.task_hard_time_limit + settings.worker_stale_seconds)
    with session_scope() as session:
        lost = [(j.id, j.target, j.attempts, j.max_attempts, j.worker, j.started_at)
                for j in JobRepo(session).lost_jobs(stale_before, started_before)]
    done: list[Reaped] = []
    with session_scope() as session:
        stuck = [(j.id, j.target) for j in JobRepo(session).stuck_submissions(now - SUBMIT_GRACE)]
    for job_id, target in stuck:
        if not _enqueue(job_id, target):
            continue
        with session_scope() as session:
            JobRepo(session).mark_submitted(job_id)
        log.warning("reaper: job %s enqueued (its submit request died before sending it)", job_id)
        done.append(Reaped(job_id, "enqueued", "submit request died before enqueueing"))
    done += _resend_lost_messages(now - dt.timedelta(seconds=settings.queued_resend_seconds))
    hard_before = now - dt.timedelta(seconds=settings.task_hard_time_limit)
    for job_id, target, attempts, max_attempts, worker, started_at in lost:
        try:
            outcome = _reap_one(job_id, target, attempts, max_attempts, worker, started_at, stale_before,
                                hard_before, settings)
        except InvalidTransition:
            continue  # the attempt renewed its lease, finished, or another reaper got there first
        except FeatherweightError as exc:  # the broker is away: the next round tries again
            log.warning("reaper could not requeue job %s: %s", job_id, exc.detail)
            continue
        log.warning("reaper: job %s %s (%s)", job_id, outcome.action, outcome.reason)
        done.append(outcome)
    return done


def _enqueue(job_id: str, target: str) -> bool:
    """Send job ``job_id``'s message; False (logged) when the broker does not take it."""
    try:
        queue.enqueue(job_id, target)
    except FeatherweightError as exc:
        log.warning("reaper could not enqueue job %s: %s", job_id, exc.detail)
        return False
    return True


def _resend_lost_messages(queued_before: dt.datetime) -> list[Reaped]:
    with session_scope() as session:
        waiting = [(j.id, j.target) for j in JobRepo(session).waiting_since_before(queued_before)]
    done: list[Reaped] = []
    for target in sorted({target for _, target in waiting}):
        try:
            if queue.waiting_messages(target):
                continue  # its messages are still there: a backlog, not a loss
        except FeatherweightError as exc:
            log.warning("reaper could not count the messages on %s: %s", target, exc.detail)
            continue
        for job_id in [job_id for job_id, job_target in waiting if job_target == target]:
            reason = f"queue {target} held no message for it: its message was lost, sent again"
            if not _enqueue(job_id, target):
                break  # the broker is away: the next round tries again
            with session_scope() as session:
                if not JobRepo(session).mark_resent(job_id, queued_before, reason):
                    continue  # claimed, cancelled or sent by another reaper meanwhile: the extra message is dropped
            log.warning("reaper: job %s %s", job_id, reason)
            done.append(Reaped(job_id, "resent", reason))
    return done


def _reap_one(job_id: str, target: str, attempts: int, max_attempts: int, worker: str | None,
              started_at: dt.datetime | None, stale_before: dt.datetime, hard_before: dt.datetime,
              settings: Settings) -> Reaped:
    stale = ((Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < stale_before),)
    # An attempt older than the hard limit died of it (or outlived it): it ends failed, not retried.
    if started_at is not None and started_at < hard_before:
        reason = f"the job passed its hard time limit of {settings.task_hard_time_limit} s"
        _fail(job_id, attempts, PROBLEM_TIME_LIMIT, "Time limit", reason)
        return Reaped(job_id, "failed", reason)
    if attempts >= max_attempts:
        reason = (f"the job's worker ({worker}) was lost on attempt {attempts}; "
                  f"it is not retried past {max_attempts} attempt(s)")
        _fail(job_id, attempts, PROBLEM_WORKER_LOST, "Worker lost", reason, stale)
        return Reaped(job_id, "failed", reason)
    queue.enqueue(job_id, target)
    reason = f"attempt {attempts} on {worker} was lost (no lease renewal for {settings.worker_stale_seconds} s)"
    with session_scope() as session:
        JobRepo(session).transition(
            job_id, JobState.QUEUED, expected_attempt=attempts, message=reason, stage="requeued: worker lost",
            where=stale,
        )
    return Reaped(job_id, "requeued", reason)


def _fail(job_id: str, attempts: int, type_: str, title: str, detail: str, where: tuple = ()) -> None:
    with session_scope() as session:
        JobRepo(session).transition(
            job_id, JobState.FAILED, expected_attempt=attempts, message=detail, where=where,
            error={"type": type_, "title": title, "detail": detail, "errors": []},
        )
