"""Webhooks: on every terminal state of a job that named a ``webhook_url``, a signed POST.

The outbox is the job row: the UPDATE that makes a job terminal also sets ``webhook_state='pending'``
(core.repos.jobs), so no terminal state is missed whichever process reached it (worker, reaper,
cancel). Every worker runs ``WebhookSender`` in a thread: it takes due deliveries with a guarded
UPDATE (so two workers never send the same try), POSTs, and on failure retries with exponential
backoff (``webhook_backoff_seconds * 2**(attempt-1)``, at most an hour) up to
``webhook_max_attempts`` tries; a delivery that ends in a 2xx is ``delivered``.

The request::

    POST <webhook_url>
    Content-Type: application/json
    Featherweight-Event-Id: <job id>.<state>        (the same on every retry: deduplicate on it)
    Featherweight-Timestamp: <unix seconds>
    Featherweight-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

    {"id": "<event id>", "type": "job.succeeded", "created_at": "...", "job": {id, state, ...}}

The secret is the tenant's (``featherweight webhook-secret --tenant NAME``), or
FEATHERWEIGHT_WEBHOOK_SECRET for the default tenant where set. Only http and https URLs are taken,
and a host that resolves to a private, loopback, link-local, multicast or reserved address is refused
at submit and again before each send (SSRF), unless FEATHERWEIGHT_WEBHOOK_ALLOW_PRIVATE=true.
Redirects are not followed.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from core.errors import InvalidInput
from core.settings import Settings, get_settings

log = logging.getLogger("featherweight.webhooks")
MAX_BACKOFF_SECONDS = 3600.0


def check_url(url: str, settings: Settings | None = None, field: list[Any] | None = None) -> str:
    """Return ``url`` when it may be called; InvalidInput otherwise."""
    settings = settings or get_settings()
    loc = field or ["body", "webhook_url"]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook_url must be an http or https URL with a host", [{"loc": loc, "msg": "http(s) URL required"}])
    if parts.username or parts.password:
        raise InvalidInput("webhook_url must not carry credentials", [{"loc": loc, "msg": "credentials in URL"}])
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("webhook_url has an invalid port", [{"loc": loc, "msg": "bad port"}]) from None
    if settings.webhook_allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"webhook_url host {parts.hostname!r} does not resolve", [{"loc": loc, "msg": "unknown host"}]) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise InvalidInput(f"webhook_url resolves to a non-public address ({address})",
                               [{"loc": loc, "msg": "private, loopback or reserved address"}])
    return url


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, timestamp: str, body: bytes, header: str, tolerance_s: int = 300, now: float | None = None) -> bool:
    """The receiver's check (also what the README shows): fresh timestamp and a matching signature."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((now or time.time()) - stamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, stamp, body), header)


def event_body(job: Any) -> tuple[str, bytes]:
    event_id = f"{job.id}.{job.state}"
    payload = {
        "id": event_id,
        "type": f"job.{job.state}",
        "created_at": (job.finished_at or job.updated_at).isoformat(),
        "job": {
            "id": job.id, "state": job.state, "model_id": job.model_id, "target": job.target,
            "attempts": job.attempts, "error": job.error, "url": f"/v1/jobs/{job.id}",
            "artifacts_url": f"/v1/jobs/{job.id}/artifacts/model" if job.state == "succeeded" else None,
        },
    }
    return event_id, json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def backoff(attempt: int, settings: Settings) -> float:
    return min(MAX_BACKOFF_SECONDS, settings.webhook_backoff_seconds * 2 ** max(0, attempt - 1))


def deliver_due(settings: Settings | None = None, client: Any = None) -> int:
    """Send every due delivery once; return how many were tried."""
    import httpx

    from core.db import session_scope
    from core.models.base import utcnow
    from core.models import DEFAULT_TENANT
    from core.repos import JobRepo, TenantRepo

    settings = settings or get_settings()
    tried = 0
    own_client = client is None
    client = client or httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
    # Only what was due when this pass began: a retry it schedules waits for the next pass, even when
    # its backoff has already run out by the time the loop comes round (a loaded machine, a short backoff).
    started = utcnow()
    try:
        while True:
            now = utcnow()
            with session_scope() as session:
                jobs = JobRepo(session)
                job = jobs.take_webhook(now, lease=dt.timedelta(seconds=settings.webhook_timeout_seconds + 30),
                                        due_by=started)
                if job is None:
                    return tried
                tenant = TenantRepo(session).find(job.tenant_id)
                secret = settings.webhook_secret if (job.tenant_id == DEFAULT_TENANT and settings.webhook_secret) \
                    else (tenant.webhook_secret if tenant else None)
                event_id, body = event_body(job)
                url, attempt = job.webhook_url, job.webhook_attempts
            tried += 1
            error = _send(client, url, secret or "", event_id, body, settings)
            with session_scope() as session:
                jobs = JobRepo(session)
                if error is None:
                    jobs.webhook_done(job.id, attempt, "delivered", None)
                    log.info("webhook %s delivered to %s", event_id, url)
                elif attempt >= settings.webhook_max_attempts:
                    jobs.webhook_done(job.id, attempt, "failed", error)
                    log.warning("webhook %s failed for good after %d tries: %s", event_id, attempt, error)
                else:
                    jobs.webhook_retry(job.id, attempt, utcnow() + dt.timedelta(seconds=backoff(attempt, settings)), error)
                    log.info("webhook %s try %d failed (%s); retrying", event_id, attempt, error)
    finally:
        if own_client:
            client.close()


def _send(client: Any, url: str, secret: str, event_id: str, body: bytes, settings: Settings) -> str | None:
    import httpx

    try:
        check_url(url, settings, ["webhook_url"])
    except InvalidInput as exc:
        return exc.detail
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "featherweight-webhooks/1",
        "Featherweight-Event-Id": event_id,
        "Featherweight-Timestamp": str(timestamp),
        "Featherweight-Signature": signature(secret, timestamp, body),
    }
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


class WebhookSender:
    """Calls ``deliver_due`` every ``interval`` seconds from a daemon thread until stopped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featherweight-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                deliver_due()
            except Exception:  # the DB may be briefly away; the next round retries
                log.exception("webhook round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
