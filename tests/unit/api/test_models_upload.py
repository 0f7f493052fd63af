"""POST /v1/models: streamed upload, validation, and bad input that leaves nothing behind."""
from __future__ import annotations

import hashlib
import os
import random

import pytest
import sqlalchemy as sa

PROBLEM = "application/problem+json"


def _stored_files(home) -> list[str]:
    root = home / "artifacts"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _scratch_entries(home) -> list[str]:
    scratch = home / "scratch"
    return os.listdir(scratch) if scratch.exists() else []


def _row_count(table: str) -> int:
    from core.db import get_engine

    with get_engine().connect() as connection:
        return connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def test_upload_returns_model_description_and_stores_the_bytes(api_client, migrated, onnx_models):
    data = onnx_models.mlp().SerializeToString()
    response = api_client.post("/v1/models", files={"file": ("mlp.onnx", data, "application/octet-stream")})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["bytes"] == len(data)
    assert body["filename"] == "mlp.onnx"
    assert body["opset"] == 17
    assert body["params"] == 128 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert body["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 128]}]
    assert body["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, 10]}]
    stored = migrated / "artifacts" / "models" / body["id"] / "model.onnx"
    assert stored.read_bytes() == data
    assert _scratch_entries(migrated) == []
    assert api_client.get(f"/v1/models/{body['id']}").json()["sha256"] == body["sha256"]


def test_upload_reports_symbolic_dims(api_client, onnx_models):
    data = onnx_models.dynamic_batch().SerializeToString()
    body = api_client.post("/v1/models", files={"file": ("d.onnx", data)}).json()
    assert body["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 32]}]


def _truncated(onnx_models) -> bytes:
    data = onnx_models.mlp().SerializeToString()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("case", "payload", "status", "problem"),
    [
        ("empty", lambda m: b"", 422, "invalid-model"),
        ("random bytes", lambda m: random.Random(7).randbytes(4096), 422, "invalid-model"),
        ("truncated", _truncated, 422, "invalid-model"),
        ("zip renamed", lambda m: b"PK\x03\x04" + random.Random(8).randbytes(200), 422, "invalid-model"),
        ("elf renamed", lambda m: b"\x7fELF\x02\x01\x01" + bytes(200), 422, "invalid-model"),
    ],
)
def test_bad_upload_is_a_problem_and_leaves_nothing(api_client, migrated, onnx_models, case, payload, status, problem):
    response = api_client.post("/v1/models", files={"file": ("bad.onnx", payload(onnx_models))})
    assert response.status_code == status, (case, response.text)
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"].endswith("/" + problem)
    assert body["status"] == status
    assert body["detail"]
    assert body["errors"] and body["errors"][0]["loc"] == ["file"]
    assert _stored_files(migrated) == []
    assert _scratch_entries(migrated) == []
    assert _row_count("models") == 0


def test_upload_over_the_byte_cap_is_413(api_client, migrated, monkeypatch, onnx_models):
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    response = api_client.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())})
    assert response.status_code == 413
    assert response.json()["type"].endswith("/payload-too-large")
    assert _stored_files(migrated) == [] and _scratch_entries(migrated) == [] and _row_count("models") == 0


def test_upload_without_file_part_names_the_field(api_client, migrated):
    response = api_client.post("/v1/models", files={"other": ("x.txt", b"hello")})
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": ["body", "file"], "msg": "Field required"}]


def test_upload_that_is_not_multipart_is_400(api_client):
    response = api_client.post("/v1/models", content=b"raw", headers={"content-type": "application/octet-stream"})
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM


def test_multipart_flood_is_refused(api_client, migrated):
    fields = [(f"f{i}", (None, b"x")) for i in range(50)]
    response = api_client.post("/v1/models", files=fields)
    assert response.status_code == 400
    assert "too many multipart parts" in response.json()["detail"]
    assert _scratch_entries(migrated) == []


def test_custom_domain_is_refused(api_client, migrated, onnx_models):
    from onnx import helper

    model = onnx_models.dynamic_batch()
    model.graph.node[1].domain = "com.example.evil"
    model.opset_import.append(helper.make_opsetid("com.example.evil", 1))
    response = api_client.post("/v1/models", files={"file": ("m.onnx", model.SerializeToString())})
    assert response.status_code == 422
    assert "com.example.evil" in response.json()["detail"]
    assert _stored_files(migrated) == [] and _row_count("models") == 0


def test_unknown_model_id_is_404_problem(api_client):
    response = api_client.get("/v1/models/does-not-exist")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM


def test_disk_full_while_receiving_is_507_and_the_partial_file_is_gone(api_client, migrated, monkeypatch, onnx_models):
    import errno

    import api.multipart

    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.handle = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api.multipart, "open", FullDisk, raising=False)
    response = api_client.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())})
    assert response.status_code == 507
    assert response.json()["type"].endswith("/insufficient-storage")
    assert _scratch_entries(migrated) == [] and _stored_files(migrated) == [] and _row_count("models") == 0


def test_validation_runs_in_a_helper_process_that_is_replaced_when_killed(api_client, migrated, onnx_models):
    import signal

    from core import isolation

    data = onnx_models.mlp().SerializeToString()
    assert api_client.post("/v1/models", files={"file": ("m.onnx", data)}).status_code == 201
    helpers = isolation.helper_pids()
    assert helpers and os.getpid() not in helpers
    os.kill(helpers[0], signal.SIGKILL)
    response = api_client.post("/v1/models", files={"file": ("m.onnx", data)})
    assert response.status_code == 201, response.text
    assert isolation.helper_pids() and isolation.helper_pids() != helpers


def test_stalled_upload_is_408_and_leaves_nothing(migrated, monkeypatch):
    """A client that sends part of the body and then nothing: cut off after the idle timeout."""
    import asyncio
    import json

    monkeypatch.setenv("FEATHERWEIGHT_UPLOAD_IDLE_TIMEOUT_SECONDS", "0.2")
    from core.settings import get_settings

    get_settings.cache_clear()
    from api.main import create_app

    app = create_app()
    boundary = b"stall"
    first = b"--stall\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n\r\n" + b"\x08" * 1000
    sent = []
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.sleep(3600)  # the client stalls

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408 and json.loads(body)["type"].endswith("/request-timeout")
    assert _row_count("models") == 0 and _stored_files(migrated) == [] and _scratch_entries(migrated) == []
