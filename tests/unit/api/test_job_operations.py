"""Preflight with data sets, list / cancel / events / delete, ETag and Retry-After on the embedded default."""
from __future__ import annotations

import io

import numpy as np
import pytest
import sqlalchemy as sa

from core.db import session_scope
from core.models import JobState
from core.repos import JobRepo

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}
STATIC_INT8 = {"steps": [{"op": "quantize", "weights": {"bits": 8}, "activations": {"calibration": "minmax"}}]}


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def model_id(api_client, onnx_models) -> str:
    response = api_client.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _dataset(api_client, **arrays) -> str:
    response = api_client.post("/v1/datasets", files={"file": ("d.npz", _npz(**arrays))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _jobs_count() -> int:
    from core.db import get_engine

    with get_engine().connect() as connection:
        return connection.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar_one()


def test_recipe_needing_calibration_without_data_is_422_before_queueing(api_client, model_id):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": STATIC_INT8})
    assert response.status_code == 422, response.text
    locs = [e["loc"] for e in response.json()["errors"]]
    assert ["body", "recipe", "steps", 0, "activations", "calibration"] in locs
    assert ["body", "calibration_dataset_id"] in locs
    assert _jobs_count() == 0


@pytest.mark.parametrize("arrays, loc, words", [
    ({"y": np.zeros((4, 128), np.float32)}, "y", "matches no model input"),
    ({"x": np.zeros((4, 64), np.float32)}, "x", "shape"),
    ({"x": np.zeros((4, 2, 3, 128), np.float32)}, "x", "rank"),
    ({"x": np.zeros((4, 128), np.int64)}, "x", "dtype"),
    ({"x": np.zeros((4, 128), np.float32), "_labels": np.zeros(3, np.int64)}, "_labels", "_labels"),
])
def test_data_set_that_does_not_fit_the_inputs_is_422(api_client, model_id, arrays, loc, words):
    dataset = _dataset(api_client, **arrays)
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": STATIC_INT8,
                                                 "calibration_dataset_id": dataset})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", "calibration_dataset_id", loc]
    assert words in response.json()["detail"]
    assert _jobs_count() == 0


def test_unknown_dataset_and_student_are_422(api_client, model_id):
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "eval_dataset_id": "nope"})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "eval_dataset_id"]
    cal = _dataset(api_client, x=np.zeros((4, 128), np.float32))
    distill = {"steps": [{"op": "distill", "student_model_id": "missing"}]}
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": distill, "calibration_dataset_id": cal})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "recipe", "steps", 0, "student_model_id"]
    assert _jobs_count() == 0


def test_fitting_data_sets_are_accepted_and_recorded(api_client, model_id):
    cal = _dataset(api_client, x=np.zeros((4, 128), np.float32))
    stacked = _dataset(api_client, x=np.zeros((4, 1, 128), np.float32), _labels=np.arange(4))
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": STATIC_INT8,
                                                 "calibration_dataset_id": cal, "eval_dataset_id": stacked})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["calibration_dataset_id"] == cal and job["eval_dataset_id"] == stacked and job["max_attempts"] == 3
    # in use: neither the model nor the data set can be deleted
    assert api_client.delete(f"/v1/datasets/{cal}").status_code == 409
    assert api_client.delete(f"/v1/models/{model_id}").status_code == 409
    assert api_client.post(f"/v1/jobs/{job['id']}:cancel").status_code == 200
    assert api_client.delete(f"/v1/datasets/{cal}").status_code == 204
    assert api_client.delete(f"/v1/models/{model_id}").status_code == 204
    assert api_client.get(f"/v1/models/{model_id}").status_code == 404
    assert api_client.get(f"/v1/jobs/{job['id']}").json()["model_id"] == model_id


def test_cancel_queued_is_immediate_and_finished_is_409(api_client, model_id):
    job_id = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    response = api_client.post(f"/v1/jobs/{job_id}:cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    again = api_client.post(f"/v1/jobs/{job_id}:cancel")
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
    assert api_client.post("/v1/jobs/missing:cancel").status_code == 404
    events = api_client.get(f"/v1/jobs/{job_id}/events").json()
    assert [(e["kind"], e["state"]) for e in events] == [("state", "queued"), ("state", "cancelled")]
    assert events[-1]["message"] == "cancelled by the client"


def test_cancel_running_moves_it_out_of_running_for_the_worker_to_see(api_client, model_id):
    job_id = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    with session_scope() as session:
        assert JobRepo(session).claim(job_id, "w1")
    assert api_client.post(f"/v1/jobs/{job_id}:cancel").json()["state"] == "cancelled"
    from worker.tasks import CancelProbe

    assert CancelProbe(job_id)()


def test_list_filters_by_state_and_pages(api_client, model_id):
    ids = [api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"] for _ in range(3)]
    api_client.post(f"/v1/jobs/{ids[0]}:cancel")
    queued = api_client.get("/v1/jobs", params={"state": "queued"}).json()
    assert [j["id"] for j in queued["items"]] == [ids[2], ids[1]] and queued["next_cursor"] is None
    page = api_client.get("/v1/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in page["items"]] == [ids[2]]
    rest = api_client.get("/v1/jobs", params={"limit": 5, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["items"]] == [ids[1], ids[0]]
    assert api_client.get("/v1/jobs", params={"state": "sleeping"}).status_code == 422
    models = api_client.get("/v1/models").json()
    assert [m["id"] for m in models["items"]] == [model_id]


def test_etag_and_if_none_match_and_retry_after(api_client, model_id):
    submitted = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    assert submitted.headers["retry-after"] == "1"
    job_id = submitted.json()["id"]
    first = api_client.get(f"/v1/jobs/{job_id}")
    etag = first.headers["etag"]
    assert first.headers["retry-after"] == "2"
    unchanged = api_client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag and unchanged.content == b""
    api_client.post(f"/v1/jobs/{job_id}:cancel")
    changed = api_client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag and "retry-after" not in changed.headers


def test_delete_job_only_when_finished_and_its_artifacts_go(api_client, model_id, migrated, tmp_path):
    from core.storage import get_store

    job_id = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    assert api_client.delete(f"/v1/jobs/{job_id}").status_code == 409
    source = tmp_path / "m.onnx"
    source.write_bytes(b"compressed")
    get_store().put_file(f"jobs/{job_id}/1/model.onnx", source)
    with session_scope() as session:
        jobs = JobRepo(session)
        jobs.claim(job_id, "w")
        jobs.transition(job_id, JobState.SUCCEEDED, expected_attempt=1)
        from core.repos import ArtifactRepo

        ArtifactRepo(session).add(job_id, "model", f"jobs/{job_id}/1/model.onnx", 10, "0" * 64, "application/octet-stream")
    assert api_client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert api_client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not (migrated / "artifacts" / "jobs" / job_id / "1" / "model.onnx").exists()
    assert _jobs_count() == 0
