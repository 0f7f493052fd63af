"""The Celery application of the worker: shared broker config (core.queue) plus worker-side hooks.

``create_app()`` builds the app and registers ``worker.tasks``. Signals:

- ``worker_process_init``: a forked pool child drops the engine and store it inherited, so it never
  shares its parent's connections, and caps its own address space and CPU time (``apply_job_limits``);
  each job gets a fresh child (``worker_max_tasks_per_child`` 1), and only these children ever open
  an uploaded model with ONNX Runtime;
- ``worker_ready``: a daemon thread starts writing a heartbeat row per consumed queue every
  ``worker_heartbeat_seconds`` (the API reports "no live worker" from these rows);
  and a second daemon thread runs the reaper (core.reaper) every ``reaper_interval_seconds``,
  requeueing or failing jobs whose attempt's worker is gone, and a third sends due webhooks
  (core.webhooks);
- ``worker_shutdown``: the threads stop and the rows are removed;
- ``after_setup_logger``: with FEATHERWEIGHT_LOG_FORMAT=json, log lines are JSON carrying job_id.

``worker_argv()`` is the command line ``featherweight worker`` hands to Celery: one queue per target,
prefork with ``worker_concurrency`` processes (hard time limits need prefork), and on the filesystem
broker no gossip/mingle/heartbeat, which need a broadcast channel it does not offer well.
"""
from __future__ import annotations

import logging
import os
import threading

from celery import Celery, signals

from core import db, storage
from core.logs import use_json
from core.reaper import reap_lost_jobs
from core.webhooks import WebhookSender
from core.queue import make_celery
from core.repos import WorkerRepo
from core.settings import Settings, get_settings
from core.targets import queue_for

log = logging.getLogger("featherweight.worker")


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings, main="featherweight-worker")
    app.conf.imports = ("worker.tasks",)
    import worker.tasks  # noqa: F401 - registers the shared task on this app

    app.set_default()
    return app


def worker_argv(queues: list[str], settings: Settings | None = None, hostname: str | None = None) -> list[str]:
    settings = settings or get_settings()
    names = [queue_for(q) for q in queues]
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--queues={','.join(names)}",
        "--pool=prefork",
        f"--concurrency={settings.worker_concurrency}",
        f"--hostname={hostname or '-'.join(names) + f'.{os.getpid()}@%h'}",
    ]
    if settings.broker_is_filesystem:
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


class Heartbeat:
    """Writes (hostname, queue) rows to the ``workers`` table until stopped."""

    def __init__(self, hostname: str, queues: list[str], interval: float) -> None:
        self.hostname = hostname
        self.queues = queues
        self.interval = interval
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featherweight-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            with db.session_scope() as session:
                repo = WorkerRepo(session)
                for queue in self.queues:
                    repo.beat(self.hostname, queue, self.pid)
        except Exception:  # the DB may be briefly away; the next beat retries
            log.exception("heartbeat failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            with db.session_scope() as session:
                repo = WorkerRepo(session)
                for queue in self.queues:
                    repo.remove(self.hostname, queue)
        except Exception:  # the rows go stale on their own
            log.exception("could not remove heartbeat rows")


class Reaper:
    """Runs ``reap_lost_jobs`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featherweight-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reap_lost_jobs()
            except Exception:  # the DB may be briefly away; the next round retries
                log.exception("reaper round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


_heartbeat: Heartbeat | None = None
_reaper: Reaper | None = None
_webhooks: WebhookSender | None = None


@signals.after_setup_logger.connect(dispatch_uid="featherweight.json_logs")
@signals.after_setup_task_logger.connect(dispatch_uid="featherweight.json_task_logs")
def _json_logs(logger: logging.Logger | None = None, **_: object) -> None:
    if logger is not None and get_settings().log_format == "json":
        use_json(logger)


def apply_job_limits(settings: Settings) -> dict[str, int]:
    """Cap this (pool) process's address space and CPU time; return the limits set."""
    import resource

    applied = {}
    cpu = settings.worker_max_cpu_seconds or (settings.task_hard_time_limit * (os.cpu_count() or 1) + 60)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    applied["cpu_seconds"] = cpu
    if settings.worker_max_memory_bytes:
        memory = settings.worker_max_memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        applied["memory_bytes"] = memory
    return applied


@signals.worker_process_init.connect(dispatch_uid="featherweight.process_init")
def _reset_inherited_connections(**_: object) -> None:
    db.reset_engine(close=False)
    storage.get_store.cache_clear()
    apply_job_limits(get_settings())


@signals.worker_ready.connect(dispatch_uid="featherweight.heartbeat_start")
def _start_heartbeat(sender: object = None, **_: object) -> None:
    global _heartbeat, _reaper, _webhooks
    app = getattr(sender, "app", None)
    queues = sorted(app.amqp.queues.consume_from) if app is not None else []
    hostname = str(getattr(sender, "hostname", "") or "worker")
    settings = get_settings()
    _heartbeat = Heartbeat(hostname, queues, settings.worker_heartbeat_seconds)
    _heartbeat.start()
    _reaper = Reaper(settings.reaper_interval_seconds)
    _reaper.start()
    _webhooks = WebhookSender(settings.webhook_poll_seconds)
    _webhooks.start()
    log.info("heartbeat, reaper and webhook sender started for %s on %s", hostname, queues)


@signals.worker_shutdown.connect(dispatch_uid="featherweight.heartbeat_stop")
def _stop_heartbeat(**_: object) -> None:
    global _heartbeat, _reaper, _webhooks
    if _webhooks is not None:
        _webhooks.stop()
        _webhooks = None
    if _reaper is not None:
        _reaper.stop()
        _reaper = None
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
