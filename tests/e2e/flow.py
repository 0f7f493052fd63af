"""The user's path over real HTTP, shared by the embedded and the full-stack end-to-end tests."""
from __future__ import annotations

import hashlib
import json
import time

import httpx
import numpy as np
import onnx
import onnxruntime as ort

QUANTIZE_INT8 = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}
JOB_TIMEOUT_S = 240
TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(client: httpx.Client, model: onnx.ModelProto, name: str) -> dict:
    response = client.post("/v1/models", files={"file": (name, model.SerializeToString(), "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()


def submit(client: httpx.Client, model_id: str, recipe: dict = QUANTIZE_INT8, target: str = "cpu-x86") -> dict:
    response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe, "target": target})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def wait_done(client: httpx.Client, job_id: str, logs) -> dict:  # noqa: ANN001 - a callable returning text
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert 0.0 <= job["progress"] <= 1.0
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {JOB_TIMEOUT_S} s: {job}\n{logs()}")


def _feed(model: onnx.ModelProto, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def check_result(client: httpx.Client, job: dict, original: onnx.ModelProto, batch: int = 1) -> bytes:
    """Download the compressed model and its report; run both models in ONNX Runtime and compare."""
    artifacts = {a["name"]: a for a in job["artifacts"]}
    assert {"model", "report.json"} <= set(artifacts)
    response = client.get(artifacts["model"]["url"])
    assert response.status_code == 200
    data = response.content
    assert hashlib.sha256(data).hexdigest() == artifacts["model"]["sha256"] == response.headers["x-checksum-sha256"]
    report = client.get(artifacts["report.json"]["url"]).json()
    assert report == job["report"]
    assert report["size_ratio"] > 1.0
    for key in ("rel_l2", "cosine", "top1_agreement"):
        assert isinstance(report["fidelity"][key], float)
    assert report["steps"][0]["op"] == "quantize" and report["steps"][0]["seconds"] >= 0

    compressed = onnx.load_from_string(data)
    onnx.checker.check_model(compressed, full_check=True)
    assert [i.name for i in compressed.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in compressed.graph.output] == [o.name for o in original.graph.output]
    feeds = _feed(original, batch, np.random.default_rng(0))
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    result = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    for want, got in zip(reference, result):
        assert got.shape == want.shape and got.dtype == want.dtype
        cosine = float(np.dot(want.ravel(), got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got) + 1e-12))
        assert cosine > 0.99, cosine
    return data


def run_three_models(url: str, onnx_models, logs) -> dict[str, dict]:  # noqa: ANN001
    """Upload an MLP, a small CNN and a dynamic-batch model; quantize each; check every result."""
    models = {"mlp": onnx_models.mlp(), "cnn": onnx_models.cnn(), "dynamic": onnx_models.dynamic_batch()}
    jobs = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, model in models.items():
            jobs[name] = submit(client, upload(client, model, f"{name}.onnx")["id"])
        for name, model in models.items():
            job = wait_done(client, jobs[name]["id"], logs)
            assert job["state"] == "succeeded", f"{name}: {json.dumps(job['error'])}\n{logs()}"
            check_result(client, job, model, batch=3 if name == "dynamic" else 1)
            jobs[name] = job
    assert jobs["mlp"]["report"]["size_ratio"] >= 3.5, jobs["mlp"]["report"]["size_ratio"]
    return jobs
