"""End to end on the embedded default: ``featherweight serve`` as a subprocess, nothing else."""
from __future__ import annotations

import httpx
import pytest

from core.targets import Target, native_target
from tests.e2e.flow import QUANTIZE_INT8, run_three_models, submit, upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_upload_compress_download_on_embedded_default(embedded_service, onnx_models):
    jobs = run_three_models(embedded_service.url, onnx_models, embedded_service.logs)
    assert all(job["target"] == "cpu-x86" for job in jobs.values())
    home = embedded_service.home
    assert (home / "featherweight.db").is_file()
    for job in jobs.values():
        assert (home / "artifacts" / "jobs" / job["id"] / "1" / "model.onnx").is_file()
    assert list((home / "scratch").iterdir()) == []


def test_job_for_a_queue_without_worker_says_so(embedded_service, onnx_models):
    other = Target.CPU_ARM if native_target() is Target.CPU_X86 else Target.CPU_X86
    with httpx.Client(base_url=embedded_service.url, timeout=30) as client:
        model_id = upload(client, onnx_models.dynamic_batch(), "d.onnx")["id"]
        job = submit(client, model_id, QUANTIZE_INT8, target=other.value)
        assert job["stage"] == f"waiting: no live worker on queue '{other.value}'"
        status = client.get(f"/v1/jobs/{job['id']}").json()
        assert status["state"] == "queued"
        assert status["stage"] == f"waiting: no live worker on queue '{other.value}'"
