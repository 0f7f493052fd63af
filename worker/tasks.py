"""The Celery task that runs one compression job, and the job lifecycle around the pure pipeline.

``run_job(job_id)`` is thin: it takes an id and calls ``execute_job``. ``execute_job``:

1. claims the job (guarded UPDATE queued -> running, attempts + 1, capped by the row's
   max_attempts); a running job is re-claimed only when its attempt was lost (lease stale, or its
   process on this machine gone); a second delivery of a live or finished job returns (idempotent).
   While it runs, a ``Lease`` thread renews ``jobs.heartbeat_at``;
2. fetches the model, its calibration / evaluation data sets and a distill step's student model
   from storage into a scratch directory;
3. calls ``worker.pipeline.runner.run`` with a throttled progress callback (at most one DB write per
   ``progress_min_interval_seconds``, always on a stage change) and a cancel probe that reads the
   job's state (a job moved out of ``running`` by someone else stops at the next check);
4. uploads ``model.onnx`` and ``report.json`` (and ``report.html`` / ``model.onnx.data`` and the
   recipe's export formats, ``model.ort`` ..., where the pipeline wrote them) under ``jobs/<id>/<attempt>/`` with their sha256, and moves the job to
   ``succeeded`` (guarded on still being this attempt) and records them in one transaction; if that
   transition is refused the uploaded objects are deleted, so one artifact set is ever committed;
5. on any error marks the job ``failed`` with the problem ``type`` and ``detail`` and deletes what it
   uploaded; the scratch directory is always removed.

Outages (no job lost, none stuck): the database calls that decide the job (the claim, the final
transition, the failure) retry with backoff for ``database_retry_seconds`` while the database is
unreachable, and each object fetch or upload for ``storage_retry_seconds`` while the store is
(``Unavailable``). Past that the attempt fails with the store's error, or, when not even the failure
can be recorded, stays ``running`` with a lease that goes stale, for the reaper to requeue or fail.
A final commit whose connection dropped mid-COMMIT may have landed: the retry first looks for this
attempt's artifact rows, so it never deletes objects that committed rows point at.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from core.db import session_scope
from core.errors import FeatherweightError, InvalidTransition, PipelineError, Unavailable
from core.logs import job_context
from core.model_archive import unpack_model_archive
from core.models import JobState
from core.models.base import utcnow
from core.queue import TASK_RUN_JOB
from core.recipe import parse_recipe
from core.repos import ArtifactRepo, DatasetRepo, JobRepo, ModelRepo
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store
from worker.pipeline import artifacts

log = logging.getLogger("featherweight.worker")

# (artifact name, file the pipeline writes in its workdir, content type)
ARTIFACT_FILES: tuple[tuple[str, str, str], ...] = (
    ("model", artifacts.MODEL_FILE, "application/octet-stream"),
    ("report.json", artifacts.REPORT_FILE, "application/json"),
    ("report.html", artifacts.REPORT_HTML_FILE, "text/html; charset=utf-8"),
    # per-layer sensitivity (recipes with ``sensitivity`` or a quantize ``max_output_error``)
    (artifacts.SENSITIVITY_FILE, artifacts.SENSITIVITY_FILE, "application/json"),
    # a goal's best verified candidates after the chosen one
    *((artifacts.candidate_name(rank), artifacts.candidate_file(rank), "application/octet-stream")
      for rank in range(1, artifacts.CANDIDATE_COUNT + 1)),
    # models past protobuf's 2 GB limit keep their tensors beside model.onnx (worker.pipeline.graph.save_model)
    ("model.onnx.data", artifacts.MODEL_DATA_FILE, "application/octet-stream"),
    # the recipe's export formats; a format that failed left no file (the report says why)
    *((name, name, "text/plain; charset=utf-8" if name.endswith(".config") else "application/octet-stream")
      for files in artifacts.EXPORT_FILES.values() for name in files),
)
CANCEL_CHECK_SECONDS = 2.0


@shared_task(name=TASK_RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: str) -> None:  # noqa: ANN001 - Celery's bound task
    with job_context(job_id):
        execute_job(job_id, worker=str(self.request.hostname or socket.gethostname()), hard_kill=True)


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    key: str
    size: int
    sha256: str
    content_type: str


def worker_identity(name: str) -> str:
    """``machine:pid:name``: the machine and process that run an attempt (see ``owner_alive``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"[:255]


def owner_alive(owner: str) -> bool:
    """False only when ``owner`` (a ``worker_identity``) names a process on this machine that is gone.

    A pool child killed with SIGKILL has its message requeued at once (reject_on_worker_lost) and
    usually picked up on the same machine: this lets that delivery re-claim the job without waiting
    for the lease to go stale. Owners on other machines are judged by their lease alone.
    """
    machine, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if machine != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute_job(job_id: str, worker: str, settings: Settings | None = None, store: ObjectStore | None = None,
                hard_kill: bool = False) -> str:
    """Run job ``job_id`` to a terminal state; return the state it ended in (or the state it was found in).

    ``hard_kill`` (the Celery task sets it; a pool child is expendable): if the job leaves ``running``
    (cancelled, or failed by the reaper) and the pipeline has not stopped ``cancel_grace_seconds``
    later, the process SIGKILLs itself; the requeued message then finds the job finished.
    """
    settings = settings or get_settings()
    store = store or get_store()

    def take() -> tuple[Any, str]:
        stale_before = utcnow() - dt.timedelta(seconds=settings.worker_stale_seconds)
        with session_scope() as session:
            jobs = JobRepo(session)
            claim = jobs.claim(job_id, worker_identity(worker), stale_before=stale_before, owner_alive=owner_alive)
            found = None if claim.claimed else jobs.find(job_id)
            return claim, (found.state if found else "missing")

    claim, state = with_database_retry(take, f"claiming job {job_id}", settings)
    if not claim.claimed:
        log.info("job %s not claimed (%s, state %s): duplicate delivery or already handled",
                 job_id, claim.outcome.value, state)
        return state
    attempt = claim.attempt
    log.info("job %s: attempt %d started", job_id, attempt)

    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=settings.scratch_dir))
    uploaded: list[StoredArtifact] = []
    lease = Lease(job_id, attempt, settings.worker_heartbeat_seconds,
                  hard_kill_after=settings.cancel_grace_seconds if hard_kill else None)
    lease.start()
    try:
        from worker.pipeline.runner import run as run_pipeline
        from worker.pipeline.step import StepCancelled

        try:
            inputs = with_database_retry(lambda: _job_inputs(job_id), f"reading job {job_id}", settings)
            progress = ThrottledProgress(job_id, settings.progress_min_interval_seconds,
                                         stage_delay=settings.debug_step_delay)
            progress(0.0, "fetching the model")
            model_path = _fetch_model(store, inputs.model_key, scratch / "input", settings)
            recipe = parse_recipe(inputs.recipe)
            calibration = _fetch_dataset(store, inputs.calibration_key, scratch / "input" / "calibration.npz", settings)
            evaluation = _fetch_dataset(store, inputs.evaluation_key, scratch / "input" / "evaluation.npz", settings)
            options: dict[str, Any] = {"model_name": inputs.model_filename,   # the report's title
                                       "allow_target_mismatch": inputs.allow_target_mismatch}
            if inputs.student_key is not None:
                # the runner loads it (and refuses a student that does not load, as the model's fault)
                options["student_model_path"] = _fetch_model(store, inputs.student_key, scratch / "student", settings)
            result = run_pipeline(
                model_path, recipe, calibration=calibration, evaluation=evaluation, target=inputs.target,
                workdir=scratch / "out", progress=progress, cancelled=CancelProbe(job_id), options=options,
            )
            progress(1.0, "uploading artifacts")
            uploaded = _upload(store, job_id, attempt, result.model_path.parent, result.model_path, settings)
            _record_success(job_id, attempt, json_safe(result.report), uploaded, settings)
            log.info("job %s succeeded", job_id)
            return JobState.SUCCEEDED.value
        except StepCancelled:
            log.info("job %s stopped: it left the running state", job_id)
            _delete(store, uploaded)
            return _current_state(job_id, settings)
        except InvalidTransition as exc:
            log.warning("job %s finished but could not be marked succeeded: %s", job_id, exc)
            _delete(store, uploaded)
            return _current_state(job_id, settings)
        except SoftTimeLimitExceeded:
            _delete(store, uploaded)
            return _fail(job_id, attempt, PipelineError(f"the job passed its time limit of {settings.task_soft_time_limit} s"),
                         settings)
        except FeatherweightError as exc:
            _delete(store, uploaded)
            return _fail(job_id, attempt, exc, settings)
        except Exception as exc:  # the job must end failed whatever went wrong; the log keeps the traceback
            log.exception("job %s failed unexpectedly", job_id)
            _delete(store, uploaded)
            return _fail(job_id, attempt, PipelineError(f"{type(exc).__name__}: {exc}"), settings)
    finally:
        lease.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class JobInputs:
    recipe: dict[str, Any]
    target: str
    model_key: str
    model_filename: str
    calibration_key: str | None
    evaluation_key: str | None
    student_key: str | None
    allow_target_mismatch: bool = False


def _job_inputs(job_id: str) -> JobInputs:
    """Where the job's model, data sets and distill student are stored (NotFound if one was deleted)."""
    with session_scope() as session:
        job = JobRepo(session).get(job_id)
        models, datasets = ModelRepo(session), DatasetRepo(session)
        model = models.get(job.model_id)
        students = [step.get("student_model_id") for step in job.recipe.get("steps", [])
                    if step.get("op") == "distill" and step.get("student_model_id")]
        return JobInputs(
            recipe=job.recipe, target=job.target, model_key=model.storage_key, model_filename=model.filename,
            calibration_key=datasets.get(job.calibration_dataset_id).storage_key if job.calibration_dataset_id else None,
            evaluation_key=datasets.get(job.eval_dataset_id).storage_key if job.eval_dataset_id else None,
            student_key=models.get(students[0]).storage_key if students else None,
            allow_target_mismatch=bool(job.allow_target_mismatch),
        )


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean the database could not be reached or the connection dropped."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated))


def _retry(action: Callable[[], Any], what: str, window: float, transient: Callable[[BaseException], bool]) -> Any:
    """``action()``, retried with backoff (0.5 s doubling to 5 s) while it raises a ``transient``
    error and ``window`` seconds have not passed since the first try; then the error propagates."""
    deadline = time.monotonic() + window
    delay = 0.5
    while True:
        try:
            return action()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s unavailable, retrying in %.1f s: %s", what,
                        "object storage" if isinstance(exc, Unavailable) else "database", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def with_database_retry(action: Callable[[], Any], what: str, settings: Settings) -> Any:
    return _retry(action, what, settings.database_retry_seconds, database_unavailable)


def with_storage_retry(action: Callable[[], Any], what: str, settings: Settings) -> Any:
    return _retry(action, what, settings.storage_retry_seconds, lambda exc: isinstance(exc, Unavailable))


def _record_success(job_id: str, attempt: int, report: Any, uploaded: list["StoredArtifact"], settings: Settings) -> None:
    """Move the job to ``succeeded`` (guarded on ``attempt``) and record its artifacts, in one
    transaction, retried while the database is away. A retry first checks whether an earlier try
    committed before its connection dropped (this attempt's rows are there): then it is done."""
    tries = 0

    def commit() -> None:
        nonlocal tries
        tries += 1
        with session_scope() as session:
            if tries > 1 and _recorded(session, job_id, attempt, uploaded):
                log.info("job %s: the success recorded before the connection dropped stands", job_id)
                return
            # the guarded move first: only the attempt that still owns the job records artifacts
            JobRepo(session).transition(job_id, JobState.SUCCEEDED, progress=1.0, report=report,
                                        expected_attempt=attempt)
            artifacts = ArtifactRepo(session)
            for item in uploaded:
                artifacts.add(job_id, item.name, item.key, item.size, item.sha256, item.content_type)

    with_database_retry(commit, f"recording the success of job {job_id}", settings)


def _recorded(session: Any, job_id: str, attempt: int, uploaded: list["StoredArtifact"]) -> bool:
    job = JobRepo(session).find(job_id)
    if job is None or job.state != JobState.SUCCEEDED.value or job.attempts != attempt:
        return False
    keys = {a.storage_key for a in ArtifactRepo(session).list_for_job(job_id)}
    return keys == {item.key for item in uploaded}


def _fetch_model(store: ObjectStore, key: str, folder: Path, settings: Settings) -> Path:
    """Download a stored model into ``folder``; an uploaded .zip is unpacked with the upload's checks."""
    folder.mkdir(parents=True, exist_ok=True)
    if key.endswith(".zip"):
        archive = folder.parent / f"{folder.name}.zip"
        with_storage_retry(lambda: store.get_file(key, archive), f"fetching {key}", settings)
        return unpack_model_archive(archive, folder / "model", settings)
    path = folder / "model.onnx"
    with_storage_retry(lambda: store.get_file(key, path), f"fetching {key}", settings)
    return path


def _fetch_dataset(store: ObjectStore, key: str | None, path: Path, settings: Settings) -> dict[str, Any] | None:
    if key is None:
        return None
    from worker.pipeline.data import load_npz

    with_storage_retry(lambda: store.get_file(key, path), f"fetching {key}", settings)
    return load_npz(path)  # allow_pickle=False


class Lease:
    """Renews the attempt's lease (``jobs.heartbeat_at``) every ``interval`` s from a daemon thread.

    The thread dies with the process, so a SIGKILLed attempt's lease goes stale and the reaper (or
    the redelivered message) takes the job over. Once the job is no longer this attempt's to run, and
    ``hard_kill_after`` is set, the thread gives the pipeline that many seconds to notice (its cancel
    checks) and then kills the process: the fallback for a step stuck in a C kernel.
    """

    def __init__(self, job_id: str, attempt: int, interval: float, hard_kill_after: float | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.interval = interval
        self.hard_kill_after = hard_kill_after
        self._stop = threading.Event()
        # run in a copy of the caller's context, so its log lines carry the job id too
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope() as session:
                    held = JobRepo(session).renew_lease(self.job_id, self.attempt)
            except Exception:  # the DB may be briefly away; the next renewal retries
                log.exception("could not renew the lease of job %s", self.job_id)
                continue
            if not held:  # finished, cancelled or taken over: nothing left to hold
                if self.hard_kill_after is not None and not self._stop.wait(self.hard_kill_after):
                    log.error("job %s left running %s s ago and its pipeline has not stopped: killing pid %d",
                              self.job_id, self.hard_kill_after, os.getpid())
                    os.kill(os.getpid(), signal.SIGKILL)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _upload(store: ObjectStore, job_id: str, attempt: int, workdir: Path, model_path: Path,
            settings: Settings) -> list[StoredArtifact]:
    """Store the outputs under ``jobs/<id>/<attempt>/``: attempts never overwrite each other's objects.
    Each object is retried while the store is unreachable, for ``storage_retry_seconds``."""
    stored: list[StoredArtifact] = []
    try:
        for name, filename, content_type in ARTIFACT_FILES:
            path = model_path if name == "model" else workdir / filename
            if not path.is_file():
                continue
            key = f"jobs/{job_id}/{attempt}/{filename}"
            size, digest = file_digest(path)
            try:
                with_storage_retry(functools.partial(store.put_file, key, path, content_type), f"storing {key}", settings)
            except Unavailable as exc:
                raise Unavailable(f"could not store the job's artifacts: object storage stayed unreachable for "
                                  f"{settings.storage_retry_seconds:g} s: {exc.detail}") from exc
            stored.append(StoredArtifact(name, key, size, digest, content_type))
    except BaseException:
        _delete(store, stored)
        raise
    return stored


def _delete(store: ObjectStore, artifacts: list[StoredArtifact]) -> None:
    for item in artifacts:
        try:
            store.delete(item.key)
        except Exception:  # best effort: the job's failure is the error worth reporting
            log.exception("could not delete %s", item.key)


def _fail(job_id: str, attempt: int, exc: FeatherweightError, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    error = {"type": exc.type, "title": exc.title, "detail": exc.detail, "errors": exc.to_problem()["errors"]}

    def record() -> None:
        with session_scope() as session:
            JobRepo(session).transition(job_id, JobState.FAILED, error=error, message=exc.detail[:2000],
                                        expected_attempt=attempt)

    try:
        with_database_retry(record, f"recording the failure of job {job_id}", settings)
    except InvalidTransition:  # also: an earlier try committed before its connection dropped
        return _current_state(job_id, settings)
    log.info("job %s failed: %s", job_id, exc.detail)
    return JobState.FAILED.value


def _current_state(job_id: str, settings: Settings | None = None) -> str:
    def read() -> str:
        with session_scope() as session:
            job = JobRepo(session).find(job_id)
            return job.state if job else "missing"

    if settings is None:
        return read()
    return with_database_retry(read, f"reading the state of job {job_id}", settings)


def _progress(job_id: str, fraction: float, stage: str) -> bool:
    with session_scope() as session:
        return JobRepo(session).set_progress(job_id, fraction, stage)


class ThrottledProgress:
    """The pipeline's progress callback: writes to the DB on a stage change or every ``interval`` s."""

    def __init__(self, job_id: str, interval: float, clock: Callable[[], float] = time.monotonic,
                 stage_delay: float = 0.0) -> None:
        self.job_id = job_id
        self.interval = interval
        self.clock = clock
        self.stage_delay = stage_delay
        self.last_write = -math.inf
        self.last_stage: str | None = None

    def __call__(self, fraction: float, stage: str) -> None:
        now = self.clock()
        if stage == self.last_stage and now - self.last_write < self.interval:
            return
        if stage != self.last_stage and self.stage_delay:
            time.sleep(self.stage_delay)  # FEATHERWEIGHT_DEBUG_STEP_DELAY: fault-injection tests only
        self.last_write, self.last_stage = now, stage
        try:
            _progress(self.job_id, fraction, stage)
        except Exception:  # progress is advisory; a DB hiccup must not fail the compression
            log.exception("could not record progress of job %s", self.job_id)


class CancelProbe:
    """The pipeline's ``cancelled`` callback: true once the job is no longer ``running`` (read every 2 s)."""

    def __init__(self, job_id: str, interval: float = CANCEL_CHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id = job_id
        self.interval = interval
        self.clock = clock
        self.last_check = -math.inf
        self.stopped = False

    def __call__(self) -> bool:
        now = self.clock()
        if self.stopped or now - self.last_check < self.interval:
            return self.stopped
        self.last_check = now
        try:
            self.stopped = _current_state(self.job_id) != JobState.RUNNING.value
        except Exception:  # cannot read the state: keep working, the next check may succeed
            log.exception("could not read the state of job %s", self.job_id)
        return self.stopped


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def json_safe(value: Any) -> Any:
    """The report as plain JSON values: numpy scalars to Python, NaN/Inf to None (Postgres JSON refuses them)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
