"""Faults on the real stack (Postgres, Redis, the S3 server, Celery worker subprocesses).

FEATHERWEIGHT_DEBUG_STEP_DELAY makes each stage of a job last a second (about ten per job), so a worker can
be killed while it holds a job.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import Service, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = {"steps": [{"op": "cleanup"},
                    {"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}
FAST_FAULTS = {
    "FEATHERWEIGHT_WEBHOOK_ALLOW_PRIVATE": "true",  # the test's receiver listens on 127.0.0.1
    "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "0.5",
    "FEATHERWEIGHT_WORKER_STALE_SECONDS": "3",
    "FEATHERWEIGHT_REAPER_INTERVAL_SECONDS": "1",
    "FEATHERWEIGHT_DEBUG_STEP_DELAY": "1",
}
DEADLINE_S = 240


@contextlib.contextmanager
def _api_client(settings: dict[str, str], monkeypatch):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.conftest import reset_service_caches

    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    reset_service_caches()
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


@contextlib.contextmanager
def _worker_service(full_stack: dict[str, str], settings: dict[str, str], log_dir):
    service = Service("", log_dir)
    env = subprocess_env({**full_stack, **settings})

    def start(name: str):
        return service.start(name, [sys.executable, "-m", "featherweight.cli", "worker", "--queue", "cpu-x86"], env)

    service.start_worker = start  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def api(full_stack, monkeypatch):
    with _api_client(FAST_FAULTS, monkeypatch) as client:
        yield client


@pytest.fixture
def workers(full_stack, tmp_path):
    with _worker_service(full_stack, FAST_FAULTS, tmp_path) as service:
        yield service


def _wait(api, job_id: str, until, logs) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    job: dict = {}
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}\n{logs()}")


def _bucket_keys(prefix: str) -> list[str]:
    from core.storage import get_store

    store = get_store()
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_sigkilled_worker_job_completes_on_a_retry_with_one_artifact_set(api, workers, onnx_models):
    model_id = api.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
    first = workers.start_worker("worker-1")
    job_id = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    _wait(api, job_id, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), workers.logs)
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker: main process and pool child
    first.wait()

    workers.start_worker("worker-2")
    job = _wait(api, job_id, lambda j: j["state"] in {"succeeded", "failed", "cancelled"}, workers.logs)
    assert job["state"] == "succeeded", f"{job}\n{workers.logs()}"
    assert job["attempts"] == 2
    names = [a["name"] for a in job["artifacts"]]
    assert "model" in names and len(names) == len(set(names))
    from core.db import session_scope
    from core.repos import ArtifactRepo, JobRepo

    with session_scope() as session:
        stored = sorted(a.storage_key for a in ArtifactRepo(session).list_for_job(job_id))
        messages = [e.message or "" for e in JobRepo(session).events(job_id)]
    # exactly one artifact set, all from the attempt that committed, and nothing else in the bucket
    assert stored and all(key.startswith(f"jobs/{job_id}/2/") for key in stored)
    assert _bucket_keys(f"jobs/{job_id}/") == stored
    assert any("was lost" in message for message in messages), messages


def test_cancel_mid_run_stops_the_worker_and_signs_a_webhook(api, workers, onnx_models):
    from core import webhooks
    from core.db import session_scope
    from core.repos import TenantRepo
    from tests.unit.core.test_webhooks import Receiver

    receiver = Receiver()
    try:
        model_id = api.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
        workers.start_worker("worker")
        job_id = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE,
                                            "webhook_url": receiver.url}).json()["id"]
        _wait(api, job_id, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), workers.logs)
        response = api.post(f"/v1/jobs/{job_id}:cancel")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        # the one worker process is free again only once the cancelled pipeline stopped: a second job runs
        second = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
        done = _wait(api, second, lambda j: j["state"] in {"succeeded", "failed", "cancelled"}, workers.logs)
        assert done["state"] == "succeeded", f"{done}\n{workers.logs()}"
        job = _wait(api, job_id, lambda j: j["webhook_state"] in {"delivered", "failed"}, workers.logs)
        assert job["state"] == "cancelled" and job["artifacts"] == [] and job["webhook_state"] == "delivered"
        assert _bucket_keys(f"jobs/{job_id}/") == []
        (headers, body), = receiver.requests
        with session_scope() as session:
            secret = TenantRepo(session).by_name("default").webhook_secret
        assert webhooks.verify(secret, headers["featherweight-timestamp"], body, headers["featherweight-signature"])
        assert headers["featherweight-event-id"] == f"{job_id}.cancelled"
        assert "stopped: it left the running state" in workers.logs()
    finally:
        receiver.close()


class PrivateRedis:
    """A redis-server of this test's own on a free port (no persistence), to crash and restart."""

    def __init__(self, tmp_path) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.dir = tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        import subprocess

        import redis

        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("private redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def _api_on_private_redis(full_stack, tmp_path, monkeypatch, **settings: str):
    """(API test client, the private Redis, a Service to start workers in) on the full stack with a
    Redis of this test's own as the broker; ``settings`` are more FEATHERWEIGHT_* values."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.conftest import reset_service_caches

    broker = PrivateRedis(tmp_path)
    broker.start()
    env = {**full_stack, **FAST_FAULTS, "FEATHERWEIGHT_BROKER_URL": broker.url, **settings}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_service_caches()
    service = Service("", tmp_path)
    service.start_worker = lambda: service.start(  # type: ignore[attr-defined]
        "worker", [sys.executable, "-m", "featherweight.cli", "worker", "--queue", "cpu-x86"], subprocess_env(env))
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as api:
            yield api, broker, service
    finally:
        service.stop()
        broker.kill()


def test_broker_crash_and_restart_during_a_job(full_stack, tmp_path, monkeypatch, onnx_models):
    """Redis (no persistence) SIGKILLed mid-job and restarted: the running job still succeeds, and the
    worker and the API reconnect and run the next job."""
    with _api_on_private_redis(full_stack, tmp_path, monkeypatch) as (api, broker, service):
        service.start_worker()
        model_id = api.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
        first = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
        _wait(api, first, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), service.logs)
        broker.kill()
        time.sleep(1)
        broker.start()
        job = _wait(api, first, lambda j: j["state"] in {"succeeded", "failed", "cancelled"}, service.logs)
        assert job["state"] == "succeeded", f"{job}\n{service.logs()}"
        deadline = time.monotonic() + 60
        while True:  # the API's producer reconnects: a submit may answer 503 (with Retry-After) meanwhile
            response = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
            if response.status_code == 202 or time.monotonic() > deadline:
                break
            assert response.status_code == 503 and response.headers["retry-after"], response.text
            time.sleep(1)
        assert response.status_code == 202, response.text
        second = _wait(api, response.json()["id"], lambda j: j["state"] in {"succeeded", "failed"}, service.logs)
        assert second["state"] == "succeeded", f"{second}\n{service.logs()}"
        assert _bucket_keys(f"jobs/{first}/") == sorted(f"jobs/{first}/1/{n}" for n in
                                                         ("model.onnx", "report.html", "report.json"))


def test_a_job_whose_message_a_broker_restart_lost_is_sent_again(full_stack, tmp_path, monkeypatch, onnx_models):
    """Submitted while no worker runs, then Redis (no persistence) restarts empty: the job's message is
    gone. A worker's reaper finds the job queued with nothing on its queue and sends it again."""
    with _api_on_private_redis(full_stack, tmp_path, monkeypatch,
                               FEATHERWEIGHT_QUEUED_RESEND_SECONDS="2") as (api, broker, service):
        model_id = api.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
        job_id = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
        broker.kill()
        broker.start()
        service.start_worker()
        job = _wait(api, job_id, lambda j: j["state"] in {"succeeded", "failed", "cancelled"}, service.logs)
        assert job["state"] == "succeeded", f"{job}\n{service.logs()}"
        messages = [e["message"] or "" for e in api.get(f"/v1/jobs/{job_id}/events").json()]
        assert any("its message was lost, sent again" in m for m in messages), messages


def _grace_seconds() -> int:
    """The worker Deployments' terminationGracePeriodSeconds (deploy/k8s): SIGTERM to SIGKILL."""
    import yaml

    from tests.e2e.conftest import REPO_ROOT

    spec = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "base" / "worker-cpu-x86.yaml").read_text())
    return int(spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


# No worker is lost in the shutdown test: leases may go unrenewed for a while on a loaded machine
# without the reaper taking the job away from the worker that still runs it.
PATIENT = {**FAST_FAULTS, "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "1", "FEATHERWEIGHT_WORKER_STALE_SECONDS": "120"}


def test_sigterm_lets_the_running_job_finish_and_loses_no_job(full_stack, monkeypatch, tmp_path, onnx_models):
    """What Kubernetes does on scale-in, rollout or drain: SIGTERM to the worker's main process (PID 1
    in its container) only. The worker finishes the job it holds, exits 0 well within the grace
    period, and the job queued behind it stays queued for the next worker: none lost, none run twice."""
    with _api_client(PATIENT, monkeypatch) as api, _worker_service(full_stack, PATIENT, tmp_path) as workers:
        _sigterm_scenario(api, workers, onnx_models)


def _sigterm_scenario(api, workers, onnx_models) -> None:
    model_id = api.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
    first_worker = workers.start_worker("worker-1")
    running = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    _wait(api, running, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), workers.logs)
    waiting = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]

    signalled = time.monotonic()
    os.kill(first_worker.pid, signal.SIGTERM)
    grace = min(_grace_seconds(), DEADLINE_S)
    try:
        code = first_worker.wait(timeout=grace)
    except subprocess.TimeoutExpired:   # the pod would be SIGKILLed here
        raise AssertionError(f"the worker did not exit within {grace} s of SIGTERM\n{workers.logs()}") from None
    stopped_after = time.monotonic() - signalled
    assert code == 0, f"worker exit status {code}\n{workers.logs()}"

    finished = api.get(f"/v1/jobs/{running}").json()
    assert finished["state"] == "succeeded" and finished["attempts"] == 1, f"{finished}\n{workers.logs()}"
    assert api.get(f"/v1/jobs/{waiting}").json()["state"] == "queued"
    assert stopped_after < grace

    workers.start_worker("worker-2")
    done = _wait(api, waiting, lambda j: j["state"] in {"succeeded", "failed", "cancelled"}, workers.logs)
    assert done["state"] == "succeeded" and done["attempts"] == 1, f"{done}\n{workers.logs()}"
    assert api.get(f"/v1/jobs/{running}").json()["attempts"] == 1      # not run again by worker-2
