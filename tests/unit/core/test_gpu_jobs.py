"""A gpu job on a worker where CUDA cannot run fails with a clear error (the real pipeline, on this
CUDA-less host), unless the job allows the mismatch; the REST field and client parameter reach it."""
from __future__ import annotations

import pytest

from core.db import session_scope
from core.repos import JobRepo
from featherweight.client import submit_body
from worker.pipeline import host
from tests.unit.core.stored_jobs import stored_job
from worker.tasks import execute_job

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


@pytest.fixture
def cuda_less():
    host.cuda_problem.cache_clear()
    if host.cuda_problem() is None:
        pytest.skip("CUDA runs on this host")
    yield
    host.cuda_problem.cache_clear()


def _gpu_job(tmp_path, onnx_models, **fields) -> str:
    return stored_job(tmp_path, onnx_models.mlp(), RECIPE, "gpu", **fields)


def test_gpu_job_without_cuda_fails_clearly(cuda_less, migrated, tmp_path, onnx_models):
    job_id = _gpu_job(tmp_path, onnx_models)
    assert execute_job(job_id, worker="w1") == "failed"
    with session_scope() as session:
        job = JobRepo(session).get(job_id)
        assert job.report is None
        assert job.error["type"].endswith("target-unavailable")
        assert "target gpu needs CUDA" in job.error["detail"]


def test_gpu_job_allowed_to_mismatch_runs_and_says_so(cuda_less, migrated, tmp_path, onnx_models):
    job_id = _gpu_job(tmp_path, onnx_models, allow_target_mismatch=True)
    assert execute_job(job_id, worker="w1") == "succeeded"
    with session_scope() as session:
        report = JobRepo(session).get(job_id).report
    assert report["target"] == "gpu" and report["target_match"] is False and report["target_mismatch_allowed"] is True


def test_rest_field_round_trips(api_client, onnx_models):
    response = api_client.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())})
    model_id = response.json()["id"]
    body = submit_body(model_id, RECIPE, "gpu", None, None, None, allow_target_mismatch=True)
    assert body["allow_target_mismatch"] is True
    assert "allow_target_mismatch" not in submit_body(model_id, RECIPE, "gpu", None, None, None)
    created = api_client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    assert created.json()["allow_target_mismatch"] is True
    with session_scope() as session:
        assert JobRepo(session).get(created.json()["id"]).allow_target_mismatch is True
    plain = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"})
    assert plain.json()["allow_target_mismatch"] is False
