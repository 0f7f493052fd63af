"""A cpu-arm job through the REST API, run by the aarch64 worker (deploy/arm/worker.sh: Debian's
arm64 CPython, ONNX Runtime's and numpy's aarch64 wheels and our cross-built kernels, under
qemu-user) against the same Postgres, Redis and S3 server as the API.

The environment is built by deploy/arm/build_env.sh (``make arm-env``; .ci/run calls it before
``make test``). Without it the test skips with the command to build it; under CI=true it fails.
Emulation is slow (the worker alone takes about a minute to import its libraries under qemu), so
the wait is generous; nothing here times anything.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from tests.e2e.conftest import REPO_ROOT, Service, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV_DIR = Path(os.environ.get("FEATHERWEIGHT_ARM_ENV") or Path.home() / ".cache" / "featherweight-arm")
KERNELS = REPO_ROOT / "kernels" / "_ffi.cpython-311-aarch64-linux-gnu.so"
DEADLINE_S = 1200
# dynamic int8: ONNX Runtime's integer kernels read the int8 weights, stored as this host decides
RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"},
                     "activations": {"calibration": "dynamic"}}]}


def _arm_env_missing() -> str | None:
    for part in (ENV_DIR / "sysroot" / "usr" / "bin" / "python3.11", ENV_DIR / "sysroot" / "proc" / "cpuinfo",
                 ENV_DIR / "site", KERNELS):
        if not part.exists():
            return f"{part} is missing"
    return None


@pytest.fixture
def arm_worker(full_stack, tmp_path):
    missing = _arm_env_missing()
    if missing:
        message = f"the aarch64 worker environment is not built ({missing}): run `make arm-env`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: .ci/run builds it)")
        pytest.skip(message)
    service = Service("", tmp_path)
    env = subprocess_env({**full_stack, "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "2",
                          "FEATHERWEIGHT_ARM_ENV": str(ENV_DIR)})
    try:
        service.start("arm-worker", [str(REPO_ROOT / "deploy" / "arm" / "worker.sh")], env)
        yield service
    finally:
        service.stop()


@pytest.fixture
def api(full_stack):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def _finished(api, job_id: str, worker: Service) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    job: dict = {}
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in {"succeeded", "failed", "cancelled"}:
            return job
        for name, process in worker.processes:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}: {job}\n{worker.logs()}")
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {DEADLINE_S} s: {job}\n{worker.logs()}")


def test_cpu_arm_job_runs_on_the_aarch64_worker(api, arm_worker, onnx_models):
    model_id = api.post("/v1/models", files={"file": ("mlp.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
    response = api.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "cpu-arm"})
    assert response.status_code == 202, response.text
    job = _finished(api, response.json()["id"], arm_worker)
    assert job["state"] == "succeeded", f"{job}\n{arm_worker.logs()}"

    report = api.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    where = report["measured_on"]
    # every figure came from the aarch64 interpreter and ONNX Runtime's aarch64 build, under qemu
    assert where["architecture"] == "aarch64" and where["emulated"] is True, where
    assert where["cpu_model"].startswith("emulated aarch64"), where
    assert where["isa"]["neon"] is True and set(where["isa"]) == {"neon", "dotprod", "fp16", "i8mm", "sve"}, where
    # ONNX Runtime's aarch64 build at the host's version (deploy/arm pins the wheels to the venv's)
    assert where["execution_provider"] == "CPUExecutionProvider" and where["onnxruntime"] == onnxruntime.__version__
    assert report["target"] == "cpu-arm" and report["target_match"] is False
    assert "under emulation" in report["target_notice"] and "not a performance figure" in report["target_notice"]
    # the int8 storage for ARM's integer kernels: signed int8 (no u8u8 detour), chosen from aarch64
    choice, = [c for c in where["choices"] if c["choice"] == "int8 weight storage"]
    assert choice["value"] == "int8" and "aarch64" in choice["read"], choice
    quantized = [layer for layer in report["layers"] if layer.get("weight_storage")]
    assert quantized and all(layer["weight_storage"] == "int8" for layer in quantized), report["layers"]
    # fidelity measured there, on the compressed model ONNX Runtime's aarch64 build ran
    assert 0.99 < report["fidelity"]["cosine"] <= 1.0 + 1e-6, report["fidelity"]
    assert "cpu-arm" in arm_worker.logs()
    # the model the aarch64 pipeline wrote (weights quantized by the NEON kernels) runs here, close
    # to the original: x86's ONNX Runtime agrees with what the report says aarch64's measured
    compressed = api.get(f"/v1/jobs/{job['id']}/artifacts/model").content
    x = np.random.default_rng(3).standard_normal((16, 1, 128)).astype(np.float32)
    original_out, compressed_out = (_run(model, x) for model in (onnx_models.mlp().SerializeToString(), compressed))
    cosine = float(original_out @ compressed_out / np.linalg.norm(original_out) / np.linalg.norm(compressed_out))
    assert cosine > 0.99, cosine


def _run(model: bytes, samples: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: sample})[0].ravel() for sample in samples])
