"""Webhooks: the outbox set by terminal transitions, signed POSTs to a real receiver on 127.0.0.1,
retries with backoff, the cap, and SSRF refusals."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import threading

import pytest

from core import webhooks
from core.db import session_scope
from core.errors import InvalidInput
from core.models import Job, JobState
from core.models.base import utcnow
from core.repos import JobRepo, ModelRepo, TenantRepo
from core.settings import get_settings


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers with the next queued status."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def allow_loopback(migrated, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("FEATHERWEIGHT_WEBHOOK_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("FEATHERWEIGHT_WEBHOOK_MAX_ATTEMPTS", "3")
    get_settings.cache_clear()


def _job(url: str | None, tenant: str = "default") -> str:
    with session_scope() as session:
        model = ModelRepo(session).create(filename="m.onnx", sha256="0" * 64, bytes=1, params=1, opset=17, ir_version=8,
                                          inputs=[], outputs=[], storage_key="models/x/model.onnx", tenant_id=tenant)
        return JobRepo(session).create(model.id, {"steps": [{"op": "fp16"}]}, "cpu-x86", webhook_url=url,
                                       tenant_id=tenant).id


def _finish(job_id: str, state: JobState = JobState.FAILED) -> None:
    with session_scope() as session:
        JobRepo(session).transition(job_id, state, error={"detail": "x"} if state is JobState.FAILED else None)


def _row(job_id: str) -> Job:
    with session_scope() as session:
        return JobRepo(session).get(job_id)


def _due_now(job_id: str) -> None:
    with session_scope() as session:
        session.query(Job).filter(Job.id == job_id).update({Job.webhook_next_at: utcnow() - dt.timedelta(seconds=1)})


def test_terminal_state_sends_one_signed_event_the_receiver_can_verify(allow_loopback, receiver):
    job_id = _job(receiver.url)
    assert webhooks.deliver_due() == 0  # not terminal: nothing pending
    _finish(job_id)
    assert _row(job_id).webhook_state == "pending"
    assert webhooks.deliver_due() == 1
    (headers, body), = receiver.requests
    with session_scope() as session:
        secret = TenantRepo(session).by_name("default").webhook_secret
    assert webhooks.verify(secret, headers["featherweight-timestamp"], body, headers["featherweight-signature"])
    assert not webhooks.verify(secret, headers["featherweight-timestamp"], body + b" ", headers["featherweight-signature"])
    assert not webhooks.verify("other-secret-0123456789", headers["featherweight-timestamp"], body,
                               headers["featherweight-signature"])
    event = json.loads(body)
    assert headers["featherweight-event-id"] == event["id"] == f"{job_id}.failed"
    assert event["type"] == "job.failed" and event["job"]["id"] == job_id and event["job"]["error"] == {"detail": "x"}
    assert _row(job_id).webhook_state == "delivered"
    assert webhooks.deliver_due() == 0 and len(receiver.requests) == 1


def test_failures_are_retried_with_backoff_and_the_same_event_id_then_given_up(allow_loopback, receiver):
    receiver.statuses = [500, 503, 500]
    job_id = _job(receiver.url)
    _finish(job_id, JobState.CANCELLED)
    assert webhooks.deliver_due() == 1
    row = _row(job_id)
    assert row.webhook_state == "pending" and row.webhook_attempts == 1 and row.webhook_error == "HTTP 500"
    assert row.webhook_next_at > utcnow() - dt.timedelta(seconds=1)
    for _ in range(2):
        _due_now(job_id)
        webhooks.deliver_due()
    row = _row(job_id)
    assert row.webhook_state == "failed" and row.webhook_attempts == 3
    assert len({h["featherweight-event-id"] for h, _ in receiver.requests}) == 1 and len(receiver.requests) == 3
    assert webhooks.backoff(1, get_settings()) < webhooks.backoff(3, get_settings())


def test_configured_secret_signs_the_default_tenant(allow_loopback, receiver, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_WEBHOOK_SECRET", "s" * 32)
    get_settings.cache_clear()
    _finish(_job(receiver.url), JobState.CANCELLED)
    webhooks.deliver_due()
    (headers, body), = receiver.requests
    assert webhooks.verify("s" * 32, headers["featherweight-timestamp"], body, headers["featherweight-signature"])


def test_jobs_without_webhook_url_have_no_outbox_entry(migrated):
    job_id = _job(None)
    _finish(job_id)
    assert _row(job_id).webhook_state is None


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http://127.0.0.1:9/x", "http://10.0.0.1/x",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://localhost/x",
                                 "http://user:pw@example.com/x", "http:///nohost", "http://0.0.0.0/x"])
def test_unsafe_urls_are_refused(migrated, url):
    with pytest.raises(InvalidInput):
        webhooks.check_url(url)


def test_submit_refuses_a_loopback_webhook(api_client, onnx_models):
    model_id = api_client.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": {"steps": [{"op": "fp16"}]},
                                                 "webhook_url": "http://127.0.0.1:8080/hook"})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "webhook_url"]


def test_the_sender_rechecks_the_target_before_each_send(migrated, receiver):
    job_id = _job(receiver.url)  # recorded while allowed; now the setting is off
    _finish(job_id)
    webhooks.deliver_due()
    assert receiver.requests == [] and "non-public" in _row(job_id).webhook_error
