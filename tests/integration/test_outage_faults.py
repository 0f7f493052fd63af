"""Outages on the real stack: Postgres stopped mid-job, the S3 server gone at artifact upload.

Each test runs its own instance of the service that goes away (a private Postgres cluster made with
initdb, a private moto S3 server), so the shared ones other tests use are never touched, plus a
Celery worker subprocess and the API in-process. FEATHERWEIGHT_DEBUG_STEP_DELAY makes each stage of
a job last a second, so the outage lands while the job runs.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, subprocess_env
from tests.integration.test_worker_faults import FAST_FAULTS, RECIPE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_FAULTS = {**FAST_FAULTS, "FEATHERWEIGHT_DEBUG_STEP_DELAY": "1"}
DEADLINE_S = 120
TERMINAL = {"succeeded", "failed", "cancelled"}


def _unavailable(reason: str) -> None:
    message = f"cannot run a private Postgres for this test: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: failing instead of skipping)")
    pytest.skip(message)


class PrivatePostgres:
    """A Postgres cluster of this test's own (initdb in a temp dir, a free port), to stop and restart.

    initdb refuses to run as root: as root the cluster belongs to the ``postgres`` user and every
    command runs through ``runuser``."""

    def __init__(self) -> None:
        from tests.conftest import free_port

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if not initdb:
            _unavailable("no initdb in /usr/lib/postgresql/*/bin or on PATH")
        self.bin = Path(initdb).parent
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no 'postgres' user to run initdb as")
            runuser = shutil.which("runuser")
            if not runuser:
                _unavailable("running as root and there is no runuser to run initdb as 'postgres'")
            self.as_user = [runuser, "-u", "postgres", "--"]
        # not under pytest's tmp_path: as root that is mode 0700, which the postgres user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="fw-private-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        result = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        if result.returncode != 0:
            self.cleanup()
            _unavailable(f"initdb failed ({result.returncode}): {result.stdout[-2000:]}")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, str(self.bin / tool), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                           "-w", "-t", "60", "start")
        if result.returncode != 0:
            raise AssertionError(f"private Postgres did not start: {result.stdout}\n{self.log()}")

    def stop(self) -> None:
        """``-m immediate``: the server quits at once, as in a crash (recovery runs at the next start)."""
        result = self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        if result.returncode != 0:
            raise AssertionError(f"private Postgres did not stop: {result.stdout}\n{self.log()}")

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateS3:
    """A moto S3 server of this test's own on a fixed port; ``stop()`` closes its socket, so
    connections are refused (not left hanging) until ``start()`` serves the same port again.
    moto keeps its buckets in this process, so they outlive the restart."""

    def __init__(self) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        deadline = time.monotonic() + 20
        while True:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            try:
                server.start()
                break
            except OSError:  # the port is still held by the closing socket: try again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # stop() leaves the listening socket open
            self.server = None


def _poll(api, job_id: str, until, logs, deadline_s: float = DEADLINE_S) -> dict:
    """Poll the job until ``until(job)``; answers other than 200 (503 while the database is down) are
    skipped."""
    deadline = time.monotonic() + deadline_s
    job: dict = {}
    while time.monotonic() < deadline:
        response = api.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            job = response.json()
            if until(job):
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}\n{logs()}")


def _one_artifact_set(job_id: str, attempts: int) -> list[str]:
    """The job's artifact rows: all from its last attempt, each object present, nothing else stored."""
    from core.db import session_scope
    from core.repos import ArtifactRepo
    from core.storage import get_store

    with session_scope() as session:
        stored = sorted(a.storage_key for a in ArtifactRepo(session).list_for_job(job_id))
    store = get_store()
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"jobs/{job_id}/")
    in_bucket = sorted(item["Key"] for item in listing.get("Contents", []))
    expected = sorted(f"jobs/{job_id}/{attempts}/{name}" for name in ("model.onnx", "report.html", "report.json"))
    assert stored == expected, stored
    assert in_bucket == stored, in_bucket  # no row points at a missing object, no object left unrecorded
    return stored


def _configure(monkeypatch, env: dict[str, str]) -> None:
    from tests.conftest import reset_service_caches

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_service_caches()


def test_postgres_stopped_mid_job_and_restarted(fw_home, redis_url, s3_settings, tmp_path, monkeypatch, onnx_models):
    """Postgres stopped (-m immediate) while a job runs, and kept down until the job has stored its
    artifacts (so recording its end meets the outage), then started again: that job ends succeeded
    with one artifact set (on its first attempt, or a retry after the reaper requeued it), the job
    queued behind it (delivered while or just after Postgres is down) runs too, nothing is left
    running or queued, and a submit while Postgres is down is refused at once with 503 + Retry-After."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from featherweight.cli import prepare_service

    database = PrivatePostgres()
    service = Service("", tmp_path)
    try:
        database.start()
        env = {"FEATHERWEIGHT_HOME": str(fw_home), "FEATHERWEIGHT_DATABASE_URL": database.url,
               "FEATHERWEIGHT_BROKER_URL": redis_url, **s3_settings, **OUTAGE_FAULTS}
        _configure(monkeypatch, env)
        prepare_service()
        with TestClient(create_app(), raise_server_exceptions=False) as api:
            model = api.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())})
            assert model.status_code == 201, model.text
            model_id = model.json()["id"]
            service.start("worker", [sys.executable, "-m", "featherweight.cli", "worker", "--queue", "cpu-x86"],
                          subprocess_env(env))
            first = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
            behind = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
            _poll(api, first, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), service.logs)

            database.stop()
            started = time.monotonic()
            refused = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
            took = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"].isdigit(), refused.headers
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.json()["type"].endswith("/unavailable") and took < 5, (refused.json(), took)
            assert api.get(f"/v1/jobs/{first}").status_code == 503
            # the pipeline goes on without the database; once its artifacts are in S3 it is recording its end
            deadline = time.monotonic() + 60
            while len(s3_listing(f"jobs/{first}/")) < 3:
                assert time.monotonic() < deadline, ("the job's artifacts never stood in S3 while Postgres was down: the "
                                                     f"worker gave them up instead of waiting to record them\n{service.logs()}")
                time.sleep(0.2)
            time.sleep(2)  # and that meets the outage
            database.start()

            job = _poll(api, first, lambda j: j["state"] in TERMINAL, service.logs)
            assert job["state"] == "succeeded", f"{job}\n{service.logs()}"
            assert 1 <= job["attempts"] <= 2, job
            _one_artifact_set(first, job["attempts"])
            queued = _poll(api, behind, lambda j: j["state"] in TERMINAL, service.logs, deadline_s=60)
            assert queued["state"] == "succeeded", f"{queued}\n{service.logs()}"
            _one_artifact_set(behind, queued["attempts"])
            # the API's pool reconnects: the next submit is taken
            again = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
            assert again.status_code == 202, again.text
    finally:
        service.stop()
        database.cleanup()


def test_s3_unreachable_at_artifact_upload(fw_home, postgres_url, redis_url, tmp_path, monkeypatch, onnx_models):
    """The S3 server goes away while a job runs and is still away when the job stores its artifacts:
    the upload is retried and the job succeeds once S3 is back, with one artifact set and every
    recorded object present; a model upload while S3 is down answers 503 with Retry-After and
    records nothing."""
    import uuid

    from fastapi.testclient import TestClient

    from api.main import create_app
    from featherweight.cli import prepare_service

    s3 = PrivateS3()
    s3.start()
    service = Service("", tmp_path)
    try:
        env = {"FEATHERWEIGHT_HOME": str(fw_home), "FEATHERWEIGHT_DATABASE_URL": postgres_url,
               "FEATHERWEIGHT_BROKER_URL": redis_url, "FEATHERWEIGHT_STORAGE": "s3",
               "FEATHERWEIGHT_S3_ENDPOINT_URL": s3.url, "FEATHERWEIGHT_S3_BUCKET": f"fw-test-{uuid.uuid4().hex[:12]}",
               "FEATHERWEIGHT_S3_ACCESS_KEY_ID": "testing", "FEATHERWEIGHT_S3_SECRET_ACCESS_KEY": "testing",
               "FEATHERWEIGHT_S3_REGION": "us-east-1", **OUTAGE_FAULTS}
        _configure(monkeypatch, env)
        prepare_service()
        with TestClient(create_app(), raise_server_exceptions=False) as api:
            upload = onnx_models.mlp().SerializeToString()
            model = api.post("/v1/models", files={"file": ("m.onnx", upload)})
            assert model.status_code == 201, model.text
            model_id = model.json()["id"]
            service.start("worker", [sys.executable, "-m", "featherweight.cli", "worker", "--queue", "cpu-x86"],
                          subprocess_env(env))
            job_id = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
            _poll(api, job_id, lambda j: j["state"] == "running" and (j["stage"] or "").startswith("step"), service.logs)

            s3.stop()
            started = time.monotonic()
            refused = api.post("/v1/models", files={"file": ("m.onnx", upload)})
            took = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"].isdigit(), refused.headers
            assert refused.json()["type"].endswith("/unavailable") and took < 15, (refused.json(), took)
            assert [m["id"] for m in api.get("/v1/models").json()["items"]] == [model_id]

            # the worker reaches its upload while S3 is away, and keeps trying
            _poll(api, job_id, lambda j: j["stage"] == "uploading artifacts" or j["state"] in TERMINAL, service.logs)
            deadline = time.monotonic() + 30
            while "object storage unavailable, retrying" not in service.logs(tail=200_000):
                assert time.monotonic() < deadline, f"the worker never retried its upload\n{service.logs()}"
                state = api.get(f"/v1/jobs/{job_id}").json()
                assert state["state"] == "running", f"{state}\n{service.logs()}"
                time.sleep(0.2)
            time.sleep(1.5)
            assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
            s3.start()

            job = _poll(api, job_id, lambda j: j["state"] in TERMINAL, service.logs)
            assert job["state"] == "succeeded" and job["attempts"] == 1, f"{job}\n{service.logs()}"
            stored = _one_artifact_set(job_id, 1)
            for artifact in job["artifacts"]:
                response = api.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}")
                assert response.status_code == 200 and response.headers["x-checksum-sha256"] == artifact["sha256"]
            assert len(stored) == len(job["artifacts"])
            listing = s3_listing("models/")
            assert listing == [f"models/{model_id}/model.onnx"], listing  # the refused upload left nothing
    finally:
        service.stop()
        s3.stop()


def s3_listing(prefix: str) -> list[str]:
    from core.storage import get_store

    store = get_store()
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))
