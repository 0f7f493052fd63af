"""Tenants and API keys: keys from the CLI, 401 without one when required, another tenant's ids are 404,
Swagger UI's security schemes; Idempotency-Key on POST /v1/jobs."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import sqlalchemy as sa

from featherweight.cli import main as cli

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}


def _new_key(capsys, tenant: str) -> tuple[str, str]:
    assert cli(["keys", "create", "--tenant", tenant]) == 0
    out = capsys.readouterr().out
    return re.search(r"key id:\s+(\S+)", out).group(1), re.search(r"api key: (\S+)", out).group(1)


@pytest.fixture
def required(api_client, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_AUTH", "required")
    from core.settings import get_settings

    get_settings.cache_clear()
    return api_client


def test_keys_are_stored_hashed_and_listed_and_revoked(required, capsys):
    from core.db import get_engine

    key_id, key = _new_key(capsys, "acme")
    with get_engine().connect() as connection:
        stored = connection.execute(sa.text("SELECT key_sha256 FROM api_keys")).scalar_one()
    assert key not in stored and len(stored) == 64
    assert required.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert required.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    assert cli(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing and key not in listing
    assert cli(["keys", "revoke", key_id]) == 0
    response = required.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert cli(["keys", "revoke", "0000000000000000"]) == 2


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "fw_0123456789abcdef_" + "a" * 43},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_required_auth_refuses_missing_and_bad_keys(required, headers):
    for method, path in (("get", "/v1/jobs"), ("get", "/v1/models"), ("post", "/v1/datasets"), ("get", "/v1/jobs/x")):
        response = getattr(required, method)(path, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert required.get("/health").status_code == 200


def test_another_tenants_ids_answer_404_like_missing_ones(required, capsys, onnx_models):
    _, alice = _new_key(capsys, "alice")
    _, bob = _new_key(capsys, "bob")
    a = {"Authorization": f"Bearer {alice}"}
    b = {"X-API-Key": bob}
    model = required.post("/v1/models", headers=a, files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 128), np.float32))
    dataset = required.post("/v1/datasets", headers=a, files={"file": ("d.npz", buffer.getvalue())}).json()
    job = required.post("/v1/jobs", headers=a, json={"model_id": model["id"], "recipe": RECIPE}).json()
    for path in (f"/v1/models/{model['id']}", f"/v1/datasets/{dataset['id']}", f"/v1/jobs/{job['id']}",
                 f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/artifacts/model"):
        theirs, missing = required.get(path, headers=b), required.get(path.replace(path.split("/")[3], "missing"), headers=b)
        assert theirs.status_code == missing.status_code == 404, path
        assert theirs.json()["type"] == missing.json()["type"]
        assert required.get(path, headers=a).status_code in (200, 404 if "artifacts" in path else 200)
    assert required.post(f"/v1/jobs/{job['id']}:cancel", headers=b).status_code == 404
    assert required.delete(f"/v1/models/{model['id']}", headers=b).status_code == 404
    assert required.delete(f"/v1/datasets/{dataset['id']}", headers=b).status_code == 404
    assert required.get("/v1/jobs", headers=b).json()["items"] == []
    assert required.get("/v1/models", headers=b).json()["items"] == []
    # bob cannot submit against alice's model or data set either
    response = required.post("/v1/jobs", headers=b, json={"model_id": model["id"], "recipe": RECIPE})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "model_id"]
    assert [j["id"] for j in required.get("/v1/jobs", headers=a).json()["items"]] == [job["id"]]


def test_disabled_auth_serves_the_default_tenant_and_swagger_can_authorize(api_client, onnx_models):
    assert api_client.get("/v1/models").status_code == 200
    assert api_client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    schemes = api_client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"


def test_production_refuses_disabled_auth_and_requires_by_default(monkeypatch):
    from pydantic import ValidationError

    from core.settings import Settings

    assert Settings(env="production", storage="local").auth_required
    assert not Settings().auth_required
    with pytest.raises(ValidationError, match="AUTH=disabled"):
        Settings(env="production", auth="disabled")


@pytest.fixture
def model_id(api_client, onnx_models) -> str:
    return api_client.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]


def _count() -> int:
    from core.db import get_engine

    with get_engine().connect() as connection:
        return connection.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar_one()


def test_idempotency_key_same_body_same_job_other_body_422(api_client, model_id):
    body = {"model_id": model_id, "recipe": RECIPE}
    first = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["location"] == first.headers["location"]
    other = api_client.post("/v1/jobs", json={**body, "target": "gpu"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 422 and other.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k2"}).json()["id"] != first.json()["id"]
    assert api_client.post("/v1/jobs", json=body).json()["id"] != first.json()["id"]
    assert _count() == 3


def test_idempotency_key_while_the_first_request_is_in_flight_is_409(api_client, model_id, monkeypatch):
    from core import queue

    body = {"model_id": model_id, "recipe": RECIPE}
    seen = {}

    def enqueue_while_a_duplicate_arrives(job_id, target):
        seen["duplicate"] = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})

    monkeypatch.setattr(queue, "enqueue", enqueue_while_a_duplicate_arrives)
    first = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    assert first.status_code == 202 and first.json()["stage"] != "submitting"
    assert seen["duplicate"].status_code == 409
    assert _count() == 1


def test_idempotency_key_is_freed_when_the_broker_refused(api_client, model_id, monkeypatch):
    from core import queue
    from core.errors import Unavailable

    body = {"model_id": model_id, "recipe": RECIPE}
    original = queue.enqueue

    def refuse(job_id, target):
        raise Unavailable("broker down")

    monkeypatch.setattr(queue, "enqueue", refuse)
    assert api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"}).status_code == 503
    monkeypatch.setattr(queue, "enqueue", original)
    assert api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"}).status_code == 202
