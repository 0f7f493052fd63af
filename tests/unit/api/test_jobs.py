"""POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/artifacts/{name} on the embedded default."""
from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa

PROBLEM = "application/problem+json"
RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}


@pytest.fixture
def model_id(api_client, onnx_models) -> str:
    response = api_client.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _broker_messages(home) -> list[str]:
    folder = home / "broker" / "messages"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".msg")) if folder.exists() else []


def _jobs_count() -> int:
    from core.db import get_engine

    with get_engine().connect() as connection:
        return connection.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar_one()


def test_submit_queues_the_job_on_its_target_queue(api_client, migrated, model_id):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["progress"] == 0.0 and job["target"] == "gpu"
    assert job["recipe"]["steps"][0]["op"] == "quantize"
    messages = _broker_messages(migrated)
    assert len(messages) == 1 and messages[0].endswith(".gpu.msg")
    body = json.loads((migrated / "broker" / "messages" / messages[0]).read_text())
    assert body["headers"]["task"] == "featherweight.run_job"
    assert body["content-type"] == "application/json"


def test_queued_job_without_live_worker_says_so(api_client, model_id):
    job = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()
    assert job["stage"] == "waiting: no live worker on queue 'cpu-x86'"
    status = api_client.get(f"/v1/jobs/{job['id']}").json()
    assert status["state"] == "queued"
    assert status["stage"] == "waiting: no live worker on queue 'cpu-x86'"


def test_queued_job_with_live_worker_is_just_queued(api_client, model_id):
    from core.db import session_scope
    from core.repos import WorkerRepo

    with session_scope() as session:
        WorkerRepo(session).beat("worker@test", "cpu-x86", 1234)
    job = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()
    assert job["stage"] == "queued"


def test_recipe_as_yaml_text_is_accepted(api_client, model_id):
    text = "steps:\n  - op: quantize\n    weights: {bits: 8, symmetric: true, granularity: channel}\n"
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": text})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("recipe", "loc"),
    [
        ({"steps": [{"op": "shrink"}]}, ["body", "recipe", "steps", 0, "op"]),
        ({"steps": [{"op": "prune", "sparsity": 1.5}]}, ["body", "recipe", "steps", 0, "sparsity"]),
        ({"steps": [{"op": "quantize", "weights": {"bits": 0}}]}, ["body", "recipe", "steps", 0, "weights", "bits"]),
        ({"steps": []}, ["body", "recipe", "steps"]),
    ],
)
def test_bad_recipe_is_422_with_field_path_and_no_job(api_client, migrated, model_id, recipe, loc):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"].endswith("/invalid-recipe")
    assert body["errors"][0]["loc"] == loc
    assert _jobs_count() == 0
    assert _broker_messages(migrated) == []


def test_unknown_model_is_422_naming_model_id_and_no_job(api_client, migrated):
    response = api_client.post("/v1/jobs", json={"model_id": "no-such-model", "recipe": RECIPE})
    assert response.status_code == 422
    body = response.json()
    assert body["errors"] == [{"loc": ["body", "model_id"], "msg": "no such model"}]
    assert "no-such-model" in body["detail"]
    assert _jobs_count() == 0 and _broker_messages(migrated) == []


def test_unknown_target_and_extra_fields_are_422(api_client, model_id):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "tpu"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "target"]
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "webhook_url": "http://x"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "webhook_url"]
    assert _jobs_count() == 0


def test_broker_down_is_503_and_no_job(api_client, migrated, model_id, monkeypatch):
    from core import queue
    from core.errors import Unavailable

    def refuse(job_id: str, target: str) -> None:
        raise Unavailable("the job queue is unreachable: test")

    monkeypatch.setattr(queue, "enqueue", refuse)
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert _jobs_count() == 0


def test_unknown_job_is_404_problem(api_client):
    response = api_client.get("/v1/jobs/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert api_client.get("/v1/jobs/nope/artifacts/model").status_code == 404


def test_artifact_download_streams_the_stored_bytes(api_client, migrated, model_id, tmp_path):
    from core.db import session_scope
    from core.models import JobState
    from core.repos import ArtifactRepo, JobRepo
    from core.storage import get_store

    job_id = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    payload = b"compressed model bytes"
    source = tmp_path / "model.onnx"
    source.write_bytes(payload)
    get_store().put_file(f"jobs/{job_id}/model.onnx", source)
    with session_scope() as session:
        jobs = JobRepo(session)
        assert jobs.claim(job_id, "test-worker")
        ArtifactRepo(session).add(job_id, "model", f"jobs/{job_id}/model.onnx", len(payload),
                                  hashlib.sha256(payload).hexdigest(), "application/octet-stream")
        jobs.transition(job_id, JobState.SUCCEEDED, progress=1.0, report={"size_ratio": 4.0})
    status = api_client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "succeeded" and status["report"] == {"size_ratio": 4.0}
    assert status["artifacts"][0]["url"] == f"/v1/jobs/{job_id}/artifacts/model"
    for name in ("model", "model.onnx"):
        response = api_client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 200
        assert response.content == payload
        assert response.headers["x-checksum-sha256"] == hashlib.sha256(payload).hexdigest()
        assert 'filename="model.onnx"' in response.headers["content-disposition"]
    assert api_client.get(f"/v1/jobs/{job_id}/artifacts/report.html").status_code == 404
