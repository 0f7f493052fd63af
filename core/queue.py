"""Celery task names, the broker configuration shared by producer and worker, and ``enqueue()``.

The API enqueues with ``send_task`` by name, so it never imports ``worker``. Messages are JSON only;
each target has its own queue (core.targets). On the embedded default the broker is kombu's
``filesystem://`` transport (as mended in core.fs_broker) with its folders under
``$FEATHERWEIGHT_HOME/broker``; on the full stack it is Redis, with a visibility timeout longer than
the task hard time limit so a running job is never delivered twice.
"""
from __future__ import annotations

import functools
import tempfile
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError

from core.errors import Unavailable
from core.settings import Settings, get_settings
from core.targets import QUEUES, queue_for

TASK_RUN_JOB = "featherweight.run_job"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_is_filesystem:
        folder = str(settings.broker_dir / "messages")
        return {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.broker_dir / "control"),
            "polling_interval": settings.broker_polling_interval,
        }
    return {"visibility_timeout": settings.redis_visibility_timeout}


def ensure_broker_dirs(settings: Settings) -> None:
    if settings.broker_is_filesystem:
        for name in ("messages", "control"):
            (settings.broker_dir / name).mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration both the producer (API) and the worker use."""
    exchange = Exchange("featherweight", type="direct")
    return {
        "broker_url": settings.resolved_broker_url,
        # kombu's filesystem transport, mended: no half-written reads, no loss before the ack
        "broker_transport": "core.fs_broker:Transport" if settings.broker_is_filesystem else None,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_queues": [Queue(name, exchange, routing_key=name) for name in QUEUES],
        "task_default_exchange": "featherweight",
        "task_default_exchange_type": "direct",
        "task_default_queue": queue_for("cpu-x86"),
        "task_default_routing_key": queue_for("cpu-x86"),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # a fresh process per job: its memory goes back to the system and its rlimits are its own
        "worker_max_tasks_per_child": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_hard_time_limit,
        # The filesystem transport has no broadcast channel worth running; we keep liveness ourselves
        # (the workers table), so remote control is only on where the broker is a real server.
        "worker_enable_remote_control": not settings.broker_is_filesystem,
    }


def make_celery(settings: Settings, main: str = "featherweight") -> Celery:
    ensure_broker_dirs(settings)
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@functools.lru_cache(maxsize=1)
def get_producer() -> Celery:
    return make_celery(get_settings(), main="featherweight-producer")


def enqueue(job_id: str, target: str) -> None:
    """Put ``job_id`` on its target's queue; ``Unavailable`` when the broker does not take it."""
    queue = queue_for(target)
    try:
        # The default exchange ("") routes by queue name alone: kombu's Redis transport then needs no
        # binding rows in Redis, which a Redis restart without persistence (or FLUSHDB) loses while this
        # long-lived producer believes them declared, silently dropping every message after it.
        get_producer().send_task(
            TASK_RUN_JOB, args=[job_id], queue=queue, routing_key=queue, exchange="",
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises OperationalError, OSError, redis errors ...
        raise Unavailable(f"the job queue is unreachable: {type(exc).__name__}: {exc}") from exc


def waiting_messages(target: str) -> int:
    """How many messages wait on ``target``'s queue, not yet taken by a worker (``Unavailable`` when the
    broker does not answer). A message a worker has taken but not acknowledged is not counted."""
    name = queue_for(target)
    try:
        with get_producer().connection_for_read() as connection:
            try:
                return connection.default_channel.queue_declare(queue=name, passive=True).message_count
            except ChannelError as exc:
                if "NOT_FOUND" in str(exc):   # Redis keeps no empty list: a queue never used holds nothing
                    return 0
                raise
    except Exception as exc:  # kombu raises OperationalError, OSError, redis errors ...
        raise Unavailable(f"the job queue is unreachable: {type(exc).__name__}: {exc}") from exc


def check_broker() -> None:
    """Raise ``Unavailable`` when the broker cannot be reached (used by GET /ready)."""
    settings = get_settings()
    if settings.broker_is_filesystem:
        folder = settings.broker_dir / "messages"
        try:
            ensure_broker_dirs(settings)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-", suffix=".tmp"):
                pass
        except OSError as exc:
            raise Unavailable(f"broker folder {folder} is not writable: {exc}") from exc
        return
    try:
        with get_producer().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # any transport error means "not ready"
        raise Unavailable(f"broker unreachable: {type(exc).__name__}: {exc}") from exc
