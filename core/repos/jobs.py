"""Queries on the ``jobs`` and ``job_events`` tables; every state change is a guarded UPDATE.

``transition()`` moves a job only from the states ``ALLOWED_TRANSITIONS`` permits, in one
``UPDATE jobs SET state=:to WHERE id=:id AND state IN (:from...)``; a row count of 0 means another
process got there first (or the move is illegal) and raises ``InvalidTransition``. Each successful
transition and each new progress stage appends a ``job_events`` row.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import InvalidTransition, NotFound
from core.models import Job, JobEvent, JobState
from core.models.base import utcnow
from core.models.job import ALLOWED_TRANSITIONS


class JobRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, model_id: str, recipe: dict[str, Any], target: str) -> Job:
        now = utcnow()
        job = Job(
            model_id=model_id, recipe=recipe, target=target, state=JobState.QUEUED.value,
            progress=0.0, stage="queued", attempts=0, created_at=now, updated_at=now,
        )
        self.session.add(job)
        self.session.flush()
        self._event(job.id, "state", JobState.QUEUED, "queued", 0.0, None)
        return job

    def find(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id)

    def get(self, job_id: str) -> Job:
        job = self.find(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def delete(self, job_id: str) -> None:
        job = self.find(job_id)
        if job is not None:
            self.session.delete(job)
            self.session.flush()

    def transition(self, job_id: str, to: JobState, *, message: str | None = None, **values: Any) -> None:
        """Move ``job_id`` to ``to`` if its current state allows it; else raise InvalidTransition."""
        allowed = ALLOWED_TRANSITIONS[to]
        now = utcnow()
        values.setdefault("stage", to.value)
        values["updated_at"] = now
        if to is JobState.RUNNING:
            values["started_at"] = now
            values["attempts"] = Job.attempts + 1
        if to in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            values["finished_at"] = now
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_([s.value for s in allowed]))
            .values(state=to.value, **values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            current = self.session.scalar(select(Job.state).where(Job.id == job_id))
            if current is None:
                raise NotFound(f"job {job_id!r} not found")
            raise InvalidTransition(f"job {job_id!r} is {current}; it cannot become {to.value}")
        progress = values.get("progress")
        if progress is None:
            progress = self.session.scalar(select(Job.progress).where(Job.id == job_id)) or 0.0
        self._event(job_id, "state", to, values["stage"], progress, message)

    def claim(self, job_id: str, worker: str) -> bool:
        """queued -> running for this worker; False when another delivery already claimed it."""
        try:
            self.transition(job_id, JobState.RUNNING, worker=worker, progress=0.0)
        except InvalidTransition:
            return False
        return True

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
