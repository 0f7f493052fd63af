"""Queries on the ``workers`` heartbeat table."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.models import WorkerHeartbeat
from core.models.base import utcnow


class WorkerRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def beat(self, hostname: str, queue: str, pid: int, now: dt.datetime | None = None) -> None:
        """Insert or refresh the heartbeat of (hostname, queue)."""
        now = now or utcnow()
        result = self.session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.hostname == hostname, WorkerHeartbeat.queue == queue)
            .values(last_seen=now, pid=pid)
        )
        if result.rowcount == 0:
            self.session.add(WorkerHeartbeat(hostname=hostname, queue=queue, pid=pid, last_seen=now))
            self.session.flush()

    def remove(self, hostname: str, queue: str) -> None:
        self.session.execute(
            delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname, WorkerHeartbeat.queue == queue)
        )

    def has_live_worker(self, queue: str, stale_seconds: float, now: dt.datetime | None = None) -> bool:
        since = (now or utcnow()) - dt.timedelta(seconds=stale_seconds)
        found = self.session.scalar(
            select(WorkerHeartbeat.hostname)
            .where(WorkerHeartbeat.queue == queue, WorkerHeartbeat.last_seen >= since)
            .limit(1)
        )
        return found is not None
