"""The one settings object (docs/settings.md lists each), read from ``FEATHERWEIGHT_*`` environment variables.

Built on first use through the cached ``get_settings()``, never at import. The embedded default needs
no variables at all: SQLite at ``$FEATHERWEIGHT_HOME/featherweight.db``, artifacts under
``$FEATHERWEIGHT_HOME/artifacts``, and kombu's ``filesystem://`` broker with its folders under
``$FEATHERWEIGHT_HOME/broker``. The full stack sets ``FEATHERWEIGHT_DATABASE_URL`` (Postgres),
``FEATHERWEIGHT_BROKER_URL`` (Redis) and ``FEATHERWEIGHT_STORAGE=s3`` with the ``FEATHERWEIGHT_S3_*`` values.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_S3_CREDENTIAL = "minioadmin"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEATHERWEIGHT_", extra="ignore")

    env: Literal["development", "production"] = "development"
    home: Path = Field(default_factory=lambda: Path.home() / ".featherweight")

    # API keys: "required" answers 401 without a valid key; "disabled" serves everyone as the default
    # tenant (a single local user). Unset: disabled in development, required in production.
    auth: Literal["required", "disabled"] | None = None

    # Webhooks (core.webhooks): signed with the tenant's secret; FEATHERWEIGHT_WEBHOOK_SECRET, where set,
    # signs the default tenant's. Private, loopback and link-local targets are refused unless allowed.
    webhook_secret: str | None = Field(default=None, min_length=16)
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_seconds: float = Field(default=2.0, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    # Overload: past this many requests in progress the API answers 503 at once (api.overload); past
    # this many queued jobs on a target queue, a submit is 503 with Retry-After.
    api_max_inflight: int = Field(default=256, gt=0)
    max_queued_jobs: int = Field(default=10000, gt=0)

    # Logs: "json" writes one JSON object per line, with job_id in the worker (core.logs).
    log_format: Literal["text", "json"] = "text"

    # Persistence and messaging; None means the embedded default under `home`.
    database_url: str | None = None
    broker_url: str | None = None

    # Object storage.
    storage: Literal["local", "s3"] = "local"
    artifacts_dir: Path | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str = "featherweight"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"

    # Upload limits: every upload is untrusted input.
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_tensor_elements: int = Field(default=2**31, gt=0)
    max_graph_depth: int = Field(default=16, gt=0)
    max_multipart_fields: int = Field(default=8, gt=0)
    max_multipart_field_bytes: int = Field(default=64 * 1024, gt=0)
    # An upload that sends nothing for this long is cut off with 408 (a stalled or lying client).
    upload_idle_timeout_seconds: float = Field(default=30.0, gt=0)
    upload_chunk_bytes: int = Field(default=1024 * 1024, gt=0)
    # Data sets (.npz) and .zip model uploads: archives are checked entry by entry before any is read.
    max_archive_entries: int = Field(default=256, gt=0)
    max_archive_uncompressed_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    # Model validation runs in a helper process with this address-space cap (core.isolation), so the
    # API's memory stays flat; validation_in_process=true runs it in the API process instead.
    validation_max_memory_bytes: int = Field(default=8 * 1024**3, gt=0)
    validation_in_process: bool = False
    allowed_domains: tuple[str, ...] = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")

    # Jobs and workers.
    task_soft_time_limit: int = Field(default=3300, gt=0)
    task_hard_time_limit: int = Field(default=3600, gt=0)
    worker_concurrency: int = Field(default=1, gt=0)
    # Each job runs in a fresh pool process (max tasks per child 1) with these limits, so a hostile or
    # huge model cannot take the machine: address space (RLIMIT_AS, bytes; unset = no cap) and CPU
    # seconds (RLIMIT_CPU: the hard time limit times the cores, plus a minute, unless set).
    worker_max_memory_bytes: int | None = Field(default=None, gt=0)
    worker_max_cpu_seconds: int | None = Field(default=None, gt=0)
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    worker_stale_seconds: float = Field(default=30.0, gt=0)
    progress_min_interval_seconds: float = Field(default=0.5, ge=0)
    broker_polling_interval: float = Field(default=0.5, gt=0)
    # Reliability: a job gets at most job_max_attempts runs (the count lives in the jobs row); a running
    # attempt refreshes its lease (jobs.heartbeat_at) every worker_heartbeat_seconds, and a lease older
    # than worker_stale_seconds means its worker is gone. The reaper, in every worker, looks every
    # reaper_interval_seconds for such jobs and requeues them (or fails them past the cap or past the
    # hard time limit).
    job_max_attempts: int = Field(default=3, ge=1, le=100)
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    # A job queued this long whose target's queue holds no message at all lost its message (a broker
    # restarted without persistence): the reaper sends it again (core.reaper).
    queued_resend_seconds: float = Field(default=300.0, gt=0)
    # A running job that is cancelled stops at its next cancel check (seconds); if it has not stopped
    # this long after, its worker process is killed (the hard fallback).
    cancel_grace_seconds: float = Field(default=30.0, gt=0)
    # Outages: a worker that finds the database or the object store unreachable (claiming a job,
    # fetching its inputs, storing its artifacts, recording its end) retries with backoff for this
    # long before it gives the attempt up (jobs resume or fail cleanly).
    database_retry_seconds: float = Field(default=60.0, ge=0)
    storage_retry_seconds: float = Field(default=60.0, ge=0)
    # Fault-injection for tests and demos: the worker sleeps this long at every stage change of a job,
    # so a job is slow enough to kill or cancel mid-run. Refused (must be 0) in production.
    debug_step_delay: float = Field(default=0.0, ge=0, le=600)

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.task_soft_time_limit >= self.task_hard_time_limit:
            raise ValueError("task_soft_time_limit must be below task_hard_time_limit")
        if self.env == "production" and self.auth == "disabled":
            raise ValueError("production refuses FEATHERWEIGHT_AUTH=disabled")
        if self.env == "production" and self.debug_step_delay:
            raise ValueError("debug_step_delay is a test setting; production refuses it")
        if self.storage == "s3" and self.env == "production":
            for secret in (self.s3_access_key_id, self.s3_secret_access_key):
                if secret in (None, "", DEFAULT_S3_CREDENTIAL):
                    raise ValueError("production refuses missing or default S3 credentials")
        return self

    # Derived values: one place computes each default.
    @property
    def auth_required(self) -> bool:
        return (self.auth or ("required" if self.env == "production" else "disabled")) == "required"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'featherweight.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_is_filesystem(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return self.artifacts_dir or self.home / "artifacts"

    @property
    def scratch_dir(self) -> Path:
        """Where uploads stream to and workers unpack jobs; removed per use."""
        return self.home / "scratch"

    @property
    def redis_visibility_timeout(self) -> int:
        """Longer than the hard time limit, so Redis never redelivers a job that is still running."""
        return self.task_hard_time_limit + 600


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
