"""The ``workers`` table: one heartbeat row per (worker hostname, queue), refreshed every few seconds.

A queued job whose queue has no row fresher than ``worker_stale_seconds`` is reported as waiting
for a worker instead of waiting silently.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, UTCDateTime, utcnow


class WorkerHeartbeat(Base):
    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queue: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    pid: Mapped[int] = mapped_column(Integer)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
