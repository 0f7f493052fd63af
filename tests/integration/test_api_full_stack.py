"""The API on Postgres + Redis + the S3 server (in-process, no worker): upload, submit, readiness."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}


@pytest.fixture
def client(full_stack):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def _bucket_keys() -> list[str]:
    from core.storage import get_store

    store = get_store()
    listing = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_ready_on_the_full_stack(client):
    response = client.get("/ready")
    assert response.status_code == 200, response.text


def test_upload_stores_in_s3_and_submit_enqueues_on_redis(client, full_stack, onnx_models):
    import redis

    response = client.post("/v1/models", files={"file": ("cnn.onnx", onnx_models.cnn().SerializeToString())})
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    assert _bucket_keys() == [f"models/{model_id}/model.onnx"]
    response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["stage"] == "waiting: no live worker on queue 'gpu'"
    broker = redis.Redis.from_url(full_stack["FEATHERWEIGHT_BROKER_URL"])
    try:
        messages = broker.lrange("gpu", 0, -1)
    finally:
        broker.close()
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "featherweight.run_job" and message["headers"]["argsrepr"] == f"['{job_id}']"


def test_bad_upload_leaves_no_object_and_no_row(client, full_stack):
    response = client.post("/v1/models", files={"file": ("x.onnx", b"\x08\x07garbage")})
    assert response.status_code == 422
    assert _bucket_keys() == []
    engine = sa.create_engine(full_stack["FEATHERWEIGHT_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT COUNT(*) FROM models")).scalar_one() == 0
    finally:
        engine.dispose()


def test_ready_is_503_when_redis_is_unreachable(client, monkeypatch, free_tcp_port):
    from tests.conftest import reset_service_caches

    monkeypatch.setenv("FEATHERWEIGHT_BROKER_URL", f"redis://127.0.0.1:{free_tcp_port}/0")
    reset_service_caches()
    response = client.get("/ready")
    assert response.status_code == 503
    assert [e["loc"] for e in response.json()["errors"]] == [["broker"]]


def _count(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def _queued_messages(redis_url: str) -> int:
    import redis

    broker = redis.Redis.from_url(redis_url)
    try:
        return sum(broker.llen(queue) for queue in ("cpu-x86", "cpu-arm", "gpu"))
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"recipe": {"steps": [{"op": "shrink"}]}}, ["body", "recipe", "steps", 0, "op"]),
        ({"recipe": {"steps": [{"op": "prune", "sparsity": 1.5}]}}, ["body", "recipe", "steps", 0, "sparsity"]),
        ({"model_id": "00000000-0000-0000-0000-000000000000"}, ["body", "model_id"]),
    ],
)
def test_bad_submissions_leave_no_job_and_no_message(client, full_stack, onnx_models, body, loc):
    model_id = client.post("/v1/models", files={"file": ("m.onnx", onnx_models.dynamic_batch().SerializeToString())}).json()["id"]
    response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, **body})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["loc"] == loc
    assert _count(full_stack["FEATHERWEIGHT_DATABASE_URL"], "jobs") == 0
    assert _queued_messages(full_stack["FEATHERWEIGHT_BROKER_URL"]) == 0


def test_submit_with_redis_down_is_503_and_no_job(client, full_stack, onnx_models, monkeypatch, free_tcp_port):
    from tests.conftest import reset_service_caches

    model_id = client.post("/v1/models", files={"file": ("m.onnx", onnx_models.dynamic_batch().SerializeToString())}).json()["id"]
    monkeypatch.setenv("FEATHERWEIGHT_BROKER_URL", f"redis://127.0.0.1:{free_tcp_port}/0")
    reset_service_caches()
    response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert response.json()["type"].endswith("/unavailable")
    assert _count(full_stack["FEATHERWEIGHT_DATABASE_URL"], "jobs") == 0


def test_a_redis_restart_losing_the_exchange_bindings_does_not_swallow_later_jobs(client, full_stack, onnx_models):
    """Redis without persistence restarted (here: FLUSHDB) forgets kombu's binding rows; the API's
    long-lived producer must still deliver the next job's message."""
    import redis

    model_id = client.post("/v1/models", files={"file": ("cnn.onnx", onnx_models.cnn().SerializeToString())}).json()["id"]
    broker = redis.Redis.from_url(full_stack["FEATHERWEIGHT_BROKER_URL"])
    try:
        assert client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"}).status_code == 202
        broker.flushdb()
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"}).json()["id"]
        messages = broker.lrange("gpu", 0, -1)
    finally:
        broker.close()
    assert [json.loads(m)["headers"]["argsrepr"] for m in messages] == [f"['{job_id}']"]
