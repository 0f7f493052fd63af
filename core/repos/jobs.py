"""Queries on the ``jobs`` and ``job_events`` tables; every state change is a guarded UPDATE.

``transition()`` moves a job only from the states ``ALLOWED_TRANSITIONS`` permits, in one
``UPDATE jobs SET state=:to WHERE id=:id AND state IN (:from...)``; a row count of 0 means another
process got there first (or the move is illegal) and raises ``InvalidTransition``. Each successful
transition and each new progress stage appends a ``job_events`` row.

Attempts: ``claim()`` counts every run in ``jobs.attempts`` and refuses past ``jobs.max_attempts``;
a running attempt holds a lease (``heartbeat_at``), and the worker's success or failure is recorded
only while the job is still on that attempt (``expected_attempt``), so an attempt presumed lost
can never commit a second set of artifacts.
"""
from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from core.errors import InvalidTransition, NotFound
from core.models import Job, JobEvent, JobState
from core.models.base import utcnow
from core.models.job import ALLOWED_TRANSITIONS, TERMINAL_STATES
from core.repos.paging import Page, paginate


class JobRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, model_id: str, recipe: dict[str, Any], target: str, *, max_attempts: int = 3,
               stage: str = "queued", **fields: Any) -> Job:
        now = utcnow()
        job = Job(
            model_id=model_id, recipe=recipe, target=target, state=JobState.QUEUED.value,
            progress=0.0, stage=stage, attempts=0, max_attempts=max_attempts, created_at=now, updated_at=now,
            **fields,
        )
        self.session.add(job)
        self.session.flush()
        self._event(job.id, "state", JobState.QUEUED, "queued", 0.0, None)
        return job

    def find(self, job_id: str, tenant_id: str | None = None) -> Job | None:
        """The job, or None when missing or (with ``tenant_id``) another tenant's."""
        job = self.session.get(Job, job_id)
        if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
            return None
        return job

    def mark_submitted(self, job_id: str) -> None:
        """The job's message is on the queue: a queued job still "submitting" becomes plain "queued"."""
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value, Job.stage == "submitting")
            .values(stage=JobState.QUEUED.value).execution_options(synchronize_session=False))

    def find_by_idempotency_key(self, tenant_id: str, key: str) -> Job | None:
        return self.session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))

    def get(self, job_id: str, tenant_id: str | None = None) -> Job:
        job = self.find(job_id, tenant_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def list(self, tenant_id: str, limit: int, cursor: str | None, state: str | None = None) -> Page[Job]:
        query = select(Job).where(Job.tenant_id == tenant_id)
        if state is not None:
            query = query.where(Job.state == state)
        return paginate(self.session, query, Job, limit, cursor)

    def active_users(self, *, model_id: str | None = None, dataset_id: str | None = None) -> int:
        """How many queued or running jobs use the model (as input or distill student) or data set."""
        active = [s.value for s in (JobState.QUEUED, JobState.RUNNING)]
        query = select(Job.id, Job.recipe, Job.model_id).where(Job.state.in_(active))
        if dataset_id is not None:
            query = query.where((Job.calibration_dataset_id == dataset_id) | (Job.eval_dataset_id == dataset_id))
            return len(self.session.execute(query).all())
        count = 0
        for _, recipe, job_model in self.session.execute(query):
            students = {step.get("student_model_id") for step in (recipe or {}).get("steps", [])}
            count += job_model == model_id or model_id in students
        return count

    def delete_finished(self, job_id: str) -> bool:
        """Delete a job in a terminal state (its events and artifact rows go with it)."""
        from sqlalchemy import delete

        result = self.session.execute(
            delete(Job).where(Job.id == job_id, Job.state.in_([s.value for s in TERMINAL_STATES]))
            .execution_options(synchronize_session=False))
        return result.rowcount == 1

    def delete(self, job_id: str) -> None:
        job = self.find(job_id)
        if job is not None:
            self.session.delete(job)
            self.session.flush()

    def transition(self, job_id: str, to: JobState, *, message: str | None = None,
                   expected_attempt: int | None = None, where: tuple[Any, ...] = (), **values: Any) -> None:
        """Move ``job_id`` to ``to`` if its current state allows it (and, with ``expected_attempt``,
        if it is still on that attempt); else raise InvalidTransition."""
        allowed = ALLOWED_TRANSITIONS[to]
        now = utcnow()
        values.setdefault("stage", to.value)
        values["updated_at"] = now
        if to is JobState.RUNNING:
            values["started_at"] = now
            values["heartbeat_at"] = now
            values["attempts"] = Job.attempts + 1
        if to in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            values["finished_at"] = now
            # the webhook outbox: due now, in the same UPDATE that makes the job terminal
            values["webhook_state"] = case((Job.webhook_url.is_not(None), "pending"), else_=None)
            values["webhook_next_at"] = now
        conditions = [Job.id == job_id, Job.state.in_([s.value for s in allowed]), *where]
        if expected_attempt is not None:
            conditions.append(Job.attempts == expected_attempt)
        result = self.session.execute(
            update(Job).where(*conditions).values(state=to.value, **values).execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            row = self.session.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            if expected_attempt is not None and row.attempts != expected_attempt:
                raise InvalidTransition(f"job {job_id!r} is on attempt {row.attempts}, not {expected_attempt}; "
                                        f"it cannot become {to.value}")
            raise InvalidTransition(f"job {job_id!r} is {row.state}; it cannot become {to.value}")
        progress = values.get("progress")
        if progress is None:
            progress = self.session.scalar(select(Job.progress).where(Job.id == job_id)) or 0.0
        self._event(job_id, "state", to, values["stage"], progress, message)

    def claim(self, job_id: str, worker: str, *, stale_before: dt.datetime | None = None,
              owner_alive: Callable[[str], bool] = lambda owner: True) -> "Claim":
        """Start an attempt of ``job_id`` for ``worker``.

        queued -> running while attempts < max_attempts. A job already running is re-claimed
        (running -> running, attempts + 1, guarded on the attempt seen) when its lease is older than
        ``stale_before`` or ``owner_alive(job.worker)`` says its process is gone; past the cap it
        fails instead. Anything else (running with a live owner, finished, missing) is not claimed.
        """
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED.value, Job.attempts < Job.max_attempts)
            .values(state=JobState.RUNNING.value, worker=worker, progress=0.0, stage=JobState.RUNNING.value,
                    attempts=Job.attempts + 1, started_at=utcnow(), heartbeat_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            attempt = self.session.scalar(select(Job.attempts).where(Job.id == job_id))
            self._event(job_id, "state", JobState.RUNNING, JobState.RUNNING.value, 0.0, f"attempt {attempt} on {worker}")
            return Claim(ClaimOutcome.CLAIMED, attempt)
        job = self.session.execute(
            select(Job.state, Job.attempts, Job.max_attempts, Job.heartbeat_at, Job.worker).where(Job.id == job_id)
        ).first()
        if job is None:
            return Claim(ClaimOutcome.MISSING, 0)
        if job.state == JobState.QUEUED.value:  # queued with its attempts used up
            return self._give_up(job_id, job.attempts, JobState.QUEUED)
        if job.state != JobState.RUNNING.value:
            return Claim(ClaimOutcome.FINISHED, job.attempts)
        lost = (stale_before is not None and (job.heartbeat_at is None or job.heartbeat_at < stale_before)) \
            or not owner_alive(job.worker or "")
        if not lost:
            return Claim(ClaimOutcome.BUSY, job.attempts)
        if job.attempts >= job.max_attempts:
            return self._give_up(job_id, job.attempts, JobState.RUNNING)
        now = utcnow()
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.attempts == job.attempts)
            .values(worker=worker, progress=0.0, stage=JobState.RUNNING.value, attempts=Job.attempts + 1,
                    started_at=now, heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return Claim(ClaimOutcome.BUSY, job.attempts)
        self._event(job_id, "state", JobState.RUNNING, JobState.RUNNING.value, 0.0,
                    f"attempt {job.attempts + 1} on {worker}: attempt {job.attempts} on {job.worker} was lost")
        return Claim(ClaimOutcome.CLAIMED, job.attempts + 1)

    def _give_up(self, job_id: str, attempts: int, seen: JobState) -> "Claim":
        detail = f"the job's worker was lost {attempts} time(s); it is not retried past {attempts} attempt(s)"
        error = {"type": "https://featherweight.dev/problems/worker-lost", "title": "Worker lost",
                 "detail": detail, "errors": []}
        try:
            self.transition(job_id, JobState.FAILED, error=error, message=detail, expected_attempt=attempts,
                            where=(Job.state == seen.value,))
        except InvalidTransition:
            return Claim(ClaimOutcome.BUSY, attempts)
        return Claim(ClaimOutcome.EXHAUSTED, attempts)

    def renew_lease(self, job_id: str, attempt: int) -> bool:
        """Refresh the lease of ``attempt``; False once the job left running or moved to another attempt."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.attempts == attempt)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    def take_webhook(self, now: dt.datetime, lease: dt.timedelta, due_by: dt.datetime | None = None) -> Job | None:
        """One webhook delivery due by ``due_by`` (default ``now``), taken for this sender: attempts + 1
        and not due again before ``lease`` passes (a sender that dies mid-send leaves it to be retried)."""
        candidate = self.session.execute(
            select(Job.id, Job.webhook_attempts)
            .where(Job.webhook_state == "pending", Job.webhook_next_at <= (due_by or now))
            .order_by(Job.webhook_next_at).limit(1)
        ).first()
        if candidate is None:
            return None
        result = self.session.execute(
            update(Job)
            .where(Job.id == candidate.id, Job.webhook_state == "pending", Job.webhook_attempts == candidate.webhook_attempts)
            .values(webhook_attempts=Job.webhook_attempts + 1, webhook_next_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return None
        self.session.expire_all()
        return self.session.get(Job, candidate.id)

    def webhook_done(self, job_id: str, attempt: int, state: str, error: str | None) -> None:
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.webhook_attempts == attempt, Job.webhook_state == "pending")
            .values(webhook_state=state, webhook_error=error, webhook_next_at=None)
            .execution_options(synchronize_session=False))

    def webhook_retry(self, job_id: str, attempt: int, next_at: dt.datetime, error: str) -> None:
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.webhook_attempts == attempt, Job.webhook_state == "pending")
            .values(webhook_next_at=next_at, webhook_error=error)
            .execution_options(synchronize_session=False))

    def stuck_submissions(self, created_before: dt.datetime, limit: int = 100) -> list[Job]:
        """Queued jobs still marked "submitting" long after creation: their API request died before
        the message was sent (or before it said so)."""
        return list(self.session.scalars(
            select(Job).where(Job.state == JobState.QUEUED.value, Job.stage == "submitting",
                              Job.created_at < created_before).order_by(Job.created_at).limit(limit)))

    def waiting_since_before(self, updated_before: dt.datetime, limit: int = 100) -> list[Job]:
        """Queued jobs, past their submit, last queued (or sent again) before ``updated_before``."""
        return list(self.session.scalars(
            select(Job).where(Job.state == JobState.QUEUED.value,
                              or_(Job.stage.is_(None), Job.stage != "submitting"),
                              Job.updated_at < updated_before).order_by(Job.updated_at).limit(limit)))

    def mark_resent(self, job_id: str, updated_before: dt.datetime, message: str) -> bool:
        """Record that a queued job's message was sent again (guarded: one reaper records it)."""
        result = self.session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value, Job.updated_at < updated_before)
            .values(updated_at=utcnow()).execution_options(synchronize_session=False))
        if result.rowcount != 1:
            return False
        job = self.session.scalar(select(Job).where(Job.id == job_id))
        self._event(job_id, "stage", JobState.QUEUED, job.stage, job.progress, message)
        return True

    def count_by_state(self) -> dict[str, int]:
        from sqlalchemy import func

        return {state: count for state, count in self.session.execute(select(Job.state, func.count()).group_by(Job.state))}

    def queued_by_target(self) -> dict[str, int]:
        from sqlalchemy import func

        rows = self.session.execute(select(Job.target, func.count()).where(Job.state == JobState.QUEUED.value)
                                    .group_by(Job.target))
        return {target: count for target, count in rows}

    def run_seconds(self) -> list[tuple[str, float]]:
        """(state, seconds from the last start to the end) of every finished job that ran."""
        rows = self.session.execute(select(Job.state, Job.started_at, Job.finished_at).where(
            Job.state.in_([s.value for s in TERMINAL_STATES]), Job.started_at.is_not(None), Job.finished_at.is_not(None)))
        return [(state, max(0.0, (end - start).total_seconds())) for state, start, end in rows]

    def lost_jobs(self, stale_before: dt.datetime, started_before: dt.datetime, limit: int = 100) -> list[Job]:
        """Running jobs whose lease is older than ``stale_before`` or that started before ``started_before``."""
        return list(self.session.scalars(
            select(Job)
            .where(Job.state == JobState.RUNNING.value,
                   or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before, Job.started_at < started_before))
            .order_by(Job.started_at)
            .limit(limit)
        ))

    def set_progress(self, job_id: str, progress: float, stage: str) -> bool:
        """Record progress of a running job; appends an event when the stage changed."""
        stage = stage[:255]
        progress = min(1.0, max(0.0, float(progress)))
        previous = self.session.scalar(select(Job.stage).where(Job.id == job_id))
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(progress=progress, stage=stage, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            return False
        if stage != previous:
            self._event(job_id, "stage", JobState.RUNNING, stage, progress, None)
        return True

    def events(self, job_id: str) -> list[JobEvent]:
        return list(self.session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def _event(
        self, job_id: str, kind: str, state: JobState, stage: str | None, progress: float, message: str | None
    ) -> None:
        self.session.add(
            JobEvent(job_id=job_id, kind=kind, state=state.value, stage=stage, progress=progress, message=message)
        )
        self.session.flush()


class ClaimOutcome(str, enum.Enum):
    CLAIMED = "claimed"        # this delivery runs attempt ``Claim.attempt``
    BUSY = "busy"              # another live attempt runs it (a duplicate delivery)
    FINISHED = "finished"      # already succeeded, failed or cancelled
    EXHAUSTED = "exhausted"    # its worker was lost on the last allowed attempt: now failed
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int

    @property
    def claimed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED

    def __bool__(self) -> bool:
        return self.claimed
