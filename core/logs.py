"""JSON log lines carrying the job id (FEATHERWEIGHT_LOG_FORMAT=json).

``job_context(job_id)`` sets the id for the code it wraps (a contextvar, so threads started inside
copy it only when they are given it explicitly); ``JsonFormatter`` writes one JSON object per line
with ``ts``, ``level``, ``logger``, ``msg``, ``job_id`` (when set), ``process`` and ``exc`` (a
traceback, when there is one). The worker installs it on Celery's handlers.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterator

current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("featherweight_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.processName,
        }
        job_id = getattr(record, "job_id", None) or current_job_id.get()
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json(logger: logging.Logger) -> None:
    """Put JsonFormatter on every handler of ``logger``."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
