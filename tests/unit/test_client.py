"""featherweight.client against the real API app (in process) and, for what the app cannot be made
to do on demand (Retry-After, checksum faults, list/cancel shapes), against httpx.MockTransport."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from featherweight.client import (
    AsyncClient, ChecksumMismatch, Client, Conflict, FeatherweightAPIError, InvalidRequest, JobFailed, NotFound,
    RecipeFileError, ServerUnavailable, Unauthorized, WaitTimeout, expected_sha256, load_recipe, parse_retry_after,
)

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}
PROBLEM = "application/problem+json"


class FakeTime:
    """Stands in for time.sleep / time.monotonic so backoff is observed, not waited for."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))


def with_fake_time(client, fake: FakeTime):
    client._sleep, client._clock = fake.sleep, fake.clock
    return client


# ------------------------------------------------------------------------------ real app, in process


@pytest.fixture
def fw(api_client):
    client = Client(http=api_client)
    with_fake_time(client, FakeTime())
    yield client


@pytest.fixture
def model_file(tmp_path, onnx_models) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_models.mlp().SerializeToString())
    return path


def finish_job(job_id: str, artifacts: dict[str, bytes], report: dict | None = None) -> None:
    """Do what a worker does at the end: store artifacts, record them, mark the job succeeded."""
    from core.db import session_scope
    from core.models import JobState
    from core.repos import ArtifactRepo, JobRepo
    from core.storage import get_store

    with session_scope() as session:
        jobs = JobRepo(session)
        if jobs.get(job_id).state == "queued":
            assert jobs.claim(job_id, "test-worker")
        for name, payload in artifacts.items():
            key = f"jobs/{job_id}/{name}"
            _put(key, payload)
            ArtifactRepo(session).add(job_id, name, key, len(payload), hashlib.sha256(payload).hexdigest(),
                                      "application/octet-stream")
        jobs.transition(job_id, JobState.SUCCEEDED, progress=1.0, report=report or {"size_ratio": 4.0})


def _put(key: str, payload: bytes) -> None:
    import tempfile

    from core.storage import get_store

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(payload)
        handle.flush()
        get_store().put_file(key, Path(handle.name))


def set_running(job_id: str, progress: float, stage: str) -> None:
    from core.db import session_scope
    from core.repos import JobRepo

    with session_scope() as session:
        jobs = JobRepo(session)
        if jobs.get(job_id).state == "queued":
            assert jobs.claim(job_id, "test-worker")
        jobs.set_progress(job_id, progress, stage)


def test_upload_model_streams_with_progress_and_matching_sha256(fw, model_file):
    seen: list[tuple[int, int | None]] = []
    model = fw.upload_model(model_file, progress=lambda done, total: seen.append((done, total)))
    size = model_file.stat().st_size
    assert model.sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert model.bytes == size and model.opset == 17 and model.inputs[0]["name"] == "x"
    assert seen and seen[-1] == (size, size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_upload_of_a_non_model_is_invalid_request_with_the_problem_fields(fw, tmp_path):
    bogus = tmp_path / "not-a-model.onnx"
    bogus.write_bytes(b"\x7fELF not onnx at all")
    with pytest.raises(InvalidRequest) as caught:
        fw.upload_model(bogus)
    error = caught.value
    assert error.status == 422 and error.type.endswith("/invalid-model")
    assert error.title == "Invalid model" and error.detail
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        fw.upload_model(tmp_path / "missing.onnx")


def test_submit_accepts_a_dict_a_yaml_path_and_a_json_path(fw, model_file, tmp_path):
    model = fw.upload_model(model_file)
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("steps:\n  - op: quantize\n    weights: {bits: 8, granularity: channel}\n")
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(RECIPE))
    for recipe in (RECIPE, yaml_path, str(json_path)):
        job = fw.submit(model.id, recipe, target="cpu-x86")
        assert job.state == "queued" and job.raw["model_id"] == model.id
        assert job.raw["recipe"]["steps"][0]["op"] == "quantize"
        assert fw.get_job(job.id).id == job.id


def test_bad_recipe_names_the_field(fw, model_file):
    model = fw.upload_model(model_file)
    with pytest.raises(InvalidRequest) as caught:
        fw.submit(model.id, {"steps": [{"op": "prune", "sparsity": 1.5}]})
    assert caught.value.errors[0]["loc"] == ["body", "recipe", "steps", 0, "sparsity"]
    # The detail already names the field; the message does not repeat it.
    assert str(caught.value) == "invalid recipe: steps.0.sparsity: Input should be less than 1 [HTTP 422]"


def test_field_errors_not_in_the_detail_are_appended():
    from featherweight.client import FeatherweightAPIError

    error = FeatherweightAPIError(422, "t", "Invalid input", "2 fields are wrong",
                                  [{"loc": ["body", "target"], "msg": "not a target"},
                                   {"loc": ["body", "model_id"], "msg": "no such model"}])
    assert str(error) == ("2 fields are wrong (body.target: not a target; body.model_id: no such model) [HTTP 422]")


def test_unknown_job_and_artifact_are_not_found(fw, tmp_path):
    with pytest.raises(NotFound) as caught:
        fw.get_job("no-such-job")
    assert caught.value.status == 404
    out = tmp_path / "downloads"
    out.mkdir()
    with pytest.raises(NotFound):
        fw.download("no-such-job", "model", out / "out.onnx")
    assert list(out.iterdir()) == []


def test_broker_down_is_server_unavailable_after_one_retry(fw, model_file, monkeypatch):
    from core import queue
    from core.errors import Unavailable

    model = fw.upload_model(model_file)
    calls = []

    def refuse(job_id: str, target: str) -> None:
        calls.append(job_id)
        raise Unavailable("the job queue is unreachable: test")

    monkeypatch.setattr(queue, "enqueue", refuse)
    with pytest.raises(ServerUnavailable) as caught:
        fw.submit(model.id, RECIPE)
    assert caught.value.status == 503 and caught.value.retry_after == 5
    assert len(calls) == 2


def test_wait_follows_progress_to_success_with_growing_delays(fw, model_file):
    job = fw.submit(fw.upload_model(model_file).id, RECIPE)
    retry_after = float(fw._http.get(f"/v1/jobs/{job.id}").headers.get("Retry-After", 0))  # while unfinished

    def worker_advances(sleeps_so_far: int) -> None:
        if sleeps_so_far == 2:
            set_running(job.id, 0.5, "quantize")
        elif sleeps_so_far == 4:
            finish_job(job.id, {"model": b"onnx bytes"})

    fake = FakeTime(worker_advances)
    with_fake_time(fw, fake)
    updates = []
    final = fw.wait(job.id, timeout=600, on_progress=updates.append, poll_interval=0.25, max_interval=1.0)
    assert final.succeeded and final.report == {"size_ratio": 4.0}
    assert [(u.state, u.progress) for u in updates] == [("queued", 0.0), ("running", 0.5), ("succeeded", 1.0)]
    assert updates[1].stage == "quantize"
    # delays double from poll_interval up to max_interval, but never undercut the server's Retry-After
    assert fake.sleeps == [max(delay, retry_after) for delay in (0.25, 0.5, 1.0, 1.0)]


def test_download_streams_checks_sha256_and_names_files_in_a_directory(fw, model_file, tmp_path):
    job = fw.submit(fw.upload_model(model_file).id, RECIPE)
    payload = bytes(range(256)) * 5000
    finish_job(job.id, {"model": payload, "report.json": b'{"size_ratio": 4.0}'})
    seen = []
    result = fw.download(job.id, "model", tmp_path / "out" / "small.onnx",
                         progress=lambda done, total: seen.append((done, total)))
    assert result.path.read_bytes() == payload and result.verified
    assert result.sha256 == hashlib.sha256(payload).hexdigest()
    assert seen[-1] == (len(payload), len(payload))
    into_dir = fw.download(job.id, "model", tmp_path)
    assert into_dir.path == tmp_path / "model.onnx" and into_dir.path.read_bytes() == payload
    report = fw.download(job.id, "report.json", tmp_path)
    assert report.path.name == "report.json" and json.loads(report.path.read_text()) == {"size_ratio": 4.0}
    with pytest.raises(NotFound):
        fw.download(job.id, "report.html", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    assert not [p for p in tmp_path.rglob("*.part")]


def test_async_client_runs_the_flow_against_the_real_app(migrated, model_file, tmp_path):
    from api.main import create_app

    async def flow() -> None:
        transport = httpx.ASGITransport(app=create_app())
        async with AsyncClient(http=httpx.AsyncClient(transport=transport, base_url="http://testserver")) as fw:
            model = await fw.upload_model(model_file)
            job = await fw.submit(model.id, RECIPE)
            assert (await fw.get_job(job.id)).state == "queued"
            finish_job(job.id, {"model": b"async bytes"})
            assert (await fw.wait(job.id, timeout=5)).succeeded
            result = await fw.download(job.id, "model", tmp_path / "a.onnx")
            assert result.path.read_bytes() == b"async bytes" and result.verified
            with pytest.raises(NotFound):
                await fw.get_job("nope")

    asyncio.run(flow())


# ------------------------------------------------------------------------------ MockTransport


def job_json(state: str = "running", progress: float = 0.1, **extra) -> dict:
    return {"id": "j1", "state": state, "progress": progress, "stage": state, "error": None, "report": None,
            "artifacts": [], **extra}


def mock_client(handler, **kwargs) -> tuple[Client, FakeTime]:
    client = Client(http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fw.test"), **kwargs)
    fake = FakeTime()
    with_fake_time(client, fake)
    return client, fake


def test_wait_honours_retry_after_and_survives_a_503():
    answers = iter([
        httpx.Response(200, json=job_json(), headers={"Retry-After": "3"}),
        httpx.Response(503, json={"type": "x/unavailable", "title": "Service unavailable", "status": 503,
                                  "detail": "db restarting"}, headers={"Retry-After": "7"}),
        httpx.Response(200, json=job_json(progress=0.6)),
        httpx.Response(200, json=job_json("succeeded", 1.0)),
    ])
    client, fake = mock_client(lambda request: next(answers))
    job = client.wait("j1", timeout=100, poll_interval=0.5)
    assert job.succeeded
    # Backoff 0.5, 1, 2 but never shorter than Retry-After: 3, then 7, then 2.
    assert fake.sleeps == [3.0, 7.0, 2.0]


def test_wait_fails_at_once_when_the_job_was_never_seen_and_gives_up_after_a_long_outage():
    unavailable = {"title": "Service unavailable", "detail": "down"}
    calls = []

    def never_up(request):
        calls.append(1)
        return httpx.Response(503, json=unavailable)

    client, fake = mock_client(never_up, retries=2)
    with pytest.raises(ServerUnavailable):
        client.wait("j1")  # no timeout: it must still end
    assert len(calls) == 3 and fake.sleeps == [0.5, 1.0]

    answers = iter([httpx.Response(200, json=job_json())])
    client, fake = mock_client(lambda request: next(answers, httpx.Response(503, json=unavailable)))
    with pytest.raises(ServerUnavailable):
        client.wait("j1", outage_limit=60, max_interval=5)
    assert 60 <= sum(fake.sleeps) <= 66


def test_wait_times_out_with_the_last_job_seen():
    client, fake = mock_client(lambda request: httpx.Response(200, json=job_json(progress=0.3)))
    with pytest.raises(WaitTimeout) as caught:
        client.wait("j1", timeout=10, poll_interval=1, max_interval=4)
    assert caught.value.job.progress == 0.3 and "30%" in str(caught.value)
    assert sum(fake.sleeps) == pytest.approx(10) and fake.sleeps[:3] == [1, 2, 4]
    assert isinstance(caught.value, TimeoutError)


def test_wait_can_raise_on_failure_with_the_servers_reason():
    failed = job_json("failed", 0.4, error={"type": "x/pipeline-failed", "detail": "gptq needs calibration data"})
    client, _ = mock_client(lambda request: httpx.Response(200, json=failed))
    assert client.wait("j1").state == "failed"
    with pytest.raises(JobFailed, match="j1 failed: gptq needs calibration data"):
        client.wait("j1", raise_on_failure=True)


def test_problem_types_map_to_exception_classes_and_plain_errors_still_read():
    cases = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 400: InvalidRequest,
             413: InvalidRequest, 422: InvalidRequest, 502: ServerUnavailable, 503: ServerUnavailable}
    for status, cls in cases.items():
        body = {"type": f"https://featherweight.dev/problems/{status}", "title": "T", "status": status,
                "detail": f"detail {status}", "errors": [{"loc": ["body", "x"], "msg": "bad"}]}
        client, _ = mock_client(lambda request, s=status, b=body: httpx.Response(
            s, content=json.dumps(b), headers={"content-type": PROBLEM}), retries=0)
        with pytest.raises(cls) as caught:
            client.get_job("j1")
        assert (caught.value.status, caught.value.detail, caught.value.errors[0]["loc"]) == (status, f"detail {status}", ["body", "x"])
    client, _ = mock_client(lambda request: httpx.Response(500, text="<html>Internal Server Error</html>"))
    with pytest.raises(FeatherweightAPIError) as caught:
        client.get_job("j1")
    assert type(caught.value) is FeatherweightAPIError and caught.value.status == 500


def test_reads_are_retried_on_503_but_not_on_404():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return httpx.Response(503 if len(calls) < 3 else 200, json=job_json() if len(calls) >= 3 else {"title": "busy"})

    client, fake = mock_client(handler, retries=2)
    assert client.get_job("j1").state == "running" and len(calls) == 3 and fake.sleeps == [0.5, 1.0]
    calls.clear()
    client, _ = mock_client(lambda request: calls.append(1) or httpx.Response(404, json={"title": "Not found"}))
    with pytest.raises(NotFound):
        client.get_job("j1")
    assert calls == [1]


def test_submit_sends_only_set_fields_an_idempotency_key_and_the_api_key():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(202, json=job_json("queued", 0.0))

    client = Client(api_key="k-123", http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fw.test"))
    client.submit("m1", RECIPE)
    client.submit("m1", "steps:\n  - op: cleanup\n", target="gpu", calibration_dataset_id="d1",
                  eval_dataset_id="d2", webhook_url="https://hooks.test/x", idempotency_key="same")
    first, second = (json.loads(r.content) for r in seen)
    assert first == {"model_id": "m1", "recipe": RECIPE, "target": "cpu-x86"}
    assert second == {"model_id": "m1", "recipe": "steps:\n  - op: cleanup\n", "target": "gpu",
                      "calibration_dataset_id": "d1", "eval_dataset_id": "d2", "webhook_url": "https://hooks.test/x"}
    assert seen[0].headers["Idempotency-Key"] and seen[1].headers["Idempotency-Key"] == "same"
    assert all(r.headers["Authorization"] == "Bearer k-123" for r in seen)


def test_upload_dataset_list_jobs_and_cancel_use_the_contract_endpoints(tmp_path):
    data = tmp_path / "cal.npz"
    data.write_bytes(b"npz bytes")
    digest = hashlib.sha256(b"npz bytes").hexdigest()

    def handler(request):
        if request.method == "POST" and request.url.path == "/v1/datasets":
            assert b'filename="cal.npz"' in request.read()
            return httpx.Response(201, json={"id": "d1", "sha256": digest,
                                             "arrays": [{"name": "x", "shape": [4, 128], "dtype": "float32"}]})
        if request.url.path == "/v1/jobs":
            assert dict(request.url.params) == {"state": "running", "limit": "2"}
            return httpx.Response(200, json={"items": [job_json(), job_json(id="j2")], "next_cursor": "c2"})
        if request.method == "POST" and request.url.path == "/v1/jobs/j1:cancel":
            return httpx.Response(202, json=job_json("cancelled", 0.2))
        return httpx.Response(404, json={"title": "Not found", "detail": request.url.path})

    client, _ = mock_client(handler)
    dataset = client.upload_dataset(data)
    assert dataset.id == "d1" and dataset.arrays[0]["shape"] == [4, 128]
    page = client.list_jobs(state="running", limit=2)
    assert [j.id for j in page.jobs] == ["j1", "j2"] and page.next_cursor == "c2"
    assert client.cancel("j1").state == "cancelled"


def test_upload_is_refused_when_the_server_stored_other_bytes(tmp_path):
    data = tmp_path / "m.onnx"
    data.write_bytes(b"model")
    client, _ = mock_client(lambda request: httpx.Response(201, json={"id": "m1", "sha256": "0" * 64}))
    with pytest.raises(ChecksumMismatch, match="m.onnx"):
        client.upload_model(data)


def test_download_refuses_bytes_that_do_not_match_and_leaves_nothing(tmp_path):
    good = b"the real model"

    def handler(request):
        return httpx.Response(200, content=b"tampered bytes", headers={"X-Checksum-SHA256": hashlib.sha256(good).hexdigest()})

    client, _ = mock_client(handler)
    with pytest.raises(ChecksumMismatch):
        client.download("j1", "model", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_download_into_a_directory_ignores_paths_in_the_servers_filename(tmp_path):
    for hostile, expected in (("../../escape.onnx", "escape.onnx"), ("..", "model.onnx"), ("/etc/x", "x")):
        client, _ = mock_client(lambda request, h=hostile: httpx.Response(
            200, content=b"m", headers={"Content-Disposition": f'attachment; filename="{h}"',
                                        "X-Checksum-SHA256": hashlib.sha256(b"m").hexdigest()}))
        folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        assert client.download("j1", "model", folder).path == folder / expected
        assert [p.name for p in folder.iterdir()] == [expected]


def test_download_without_a_header_checks_the_jobs_artifact_list(tmp_path):
    payload = b"bytes from a signed storage url"

    def handler(request):
        if request.url.path == "/v1/jobs/j1/artifacts/model":
            return httpx.Response(302, headers={"Location": "http://storage.test/bucket/obj?sig=1"})
        if request.url.host == "storage.test":
            assert "Authorization" not in request.headers  # the key never goes to another origin
            return httpx.Response(200, content=payload)
        return httpx.Response(200, json=job_json("succeeded", 1.0, artifacts=[
            {"name": "model", "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
             "content_type": "application/octet-stream", "url": "/v1/jobs/j1/artifacts/model"}]))

    client = Client(api_key="secret", http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://fw.test"))
    result = client.download("j1", "model", tmp_path / "m.onnx")
    assert result.verified and result.path.read_bytes() == payload


def test_a_server_that_is_down_is_server_unavailable(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", retries=0, timeout=5)
    with pytest.raises(ServerUnavailable) as caught:
        client.get_job("j1")
    assert caught.value.status is None and f"cannot connect to http://127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(ServerUnavailable):
        client.download("j1", "model", tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ helpers


def test_load_recipe_names_the_file_on_every_fault(tmp_path):
    assert load_recipe(RECIPE) == RECIPE
    good = tmp_path / "r.yml"
    good.write_text("steps:\n  - op: fp16\n")
    assert load_recipe(good) == {"steps": [{"op": "fp16"}]}
    with pytest.raises(RecipeFileError, match="nope.yaml: no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [unclosed\n")
    with pytest.raises(RecipeFileError, match="bad.yaml: not valid YAML"):
        load_recipe(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    with pytest.raises(RecipeFileError, match="bad.json: not valid JSON"):
        load_recipe(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- op: fp16\n")
    with pytest.raises(RecipeFileError, match="a recipe is a mapping"):
        load_recipe(listed)


def test_retry_after_and_digest_headers_parse():
    assert parse_retry_after("120") == 120.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after(format_datetime(later, usegmt=True), now=(later - timedelta(seconds=30)).timestamp()) == 30
    digest = hashlib.sha256(b"x").digest()
    assert expected_sha256(httpx.Headers({"Repr-Digest": f"sha-256=:{base64.b64encode(digest).decode()}:"})) == digest.hex()
    assert expected_sha256(httpx.Headers({"X-Checksum-SHA256": digest.hex().upper()})) == digest.hex()
    assert expected_sha256(httpx.Headers({})) is None


def test_the_client_imports_no_service_package():
    code = ("import sys, featherweight.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('core', 'api', 'worker', 'kernels')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout + result.stderr
