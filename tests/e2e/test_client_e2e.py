"""End to end through the user's tools: featherweight.client and the CLI's server commands against a
live ``featherweight serve`` (one per module, built from tests/e2e/conftest.py's Service), and against
no server at all.

Endpoints that come later (data sets, list, cancel: issue 7) are exercised here as soon as the
server's OpenAPI document lists them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from featherweight.client import Client, NotFound, ServerUnavailable
from tests.conftest import free_port
from tests.e2e.conftest import REPO_ROOT, Service, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE_YAML = "steps:\n  - op: quantize\n    weights: {bits: 8, symmetric: true, granularity: channel}\n"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Service:
    """One ``featherweight serve`` for this module (like conftest's live_server, started once:
    every test here makes its own models and jobs, so they share it safely and the module stays quick)."""
    folder = tmp_path_factory.mktemp("client-e2e")
    port = free_port()
    service = Service(f"http://127.0.0.1:{port}", folder)
    env = subprocess_env({"FEATHERWEIGHT_HOME": str(folder / "home"), "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "2"})
    try:
        service.start("serve", [sys.executable, "-m", "featherweight.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env)
        service.wait_ready()
        yield service
    finally:
        service.stop()


def server_paths(url: str) -> set[str]:
    return set(httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"])


def run_model(path: Path, original: onnx.ModelProto) -> list[np.ndarray]:
    """Run a downloaded model in ONNX Runtime on the original's input names and shapes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in original.graph.input:
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    assert [i.name for i in session.get_inputs()] == [v.name for v in original.graph.input]
    return session.run(None, feeds)


def test_client_full_flow(live_server, onnx_models, tmp_path):
    url = live_server.url
    original = onnx_models.cnn()
    model_path = tmp_path / "cnn.onnx"
    model_path.write_bytes(original.SerializeToString())
    recipe_path = tmp_path / "int8.yaml"
    recipe_path.write_text(RECIPE_YAML)
    paths = server_paths(url)

    with Client(url, timeout=30) as fw:
        assert fw.health()
        sent = []
        model = fw.upload_model(model_path, progress=lambda done, total: sent.append((done, total)))
        assert sent[-1] == (model_path.stat().st_size,) * 2 and model.opset == 17

        calibration_id = None
        if "/v1/datasets" in paths:
            data = tmp_path / "cal.npz"
            np.savez(data, image=np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32))
            dataset = fw.upload_dataset(data)
            assert [a["name"] for a in dataset.arrays] == ["image"]
            calibration_id = dataset.id

        job = fw.submit(model.id, recipe_path, calibration_dataset_id=calibration_id)
        assert job.state == "queued"
        updates = []
        job = fw.wait(job.id, timeout=JOB_TIMEOUT_S, on_progress=updates.append, poll_interval=0.2)
        assert job.succeeded, f"{job.error}\n{live_server.logs()}"
        assert updates[-1].state == "succeeded" and updates[-1].progress == 1.0
        progress = [u.progress for u in updates]
        assert progress == sorted(progress)
        assert job.report["size_ratio"] > 1.0

        result = fw.download(job.id, "model", tmp_path / "out" / "cnn.int8.onnx")
        assert result.verified and result.sha256 == job.artifact("model").sha256
        outputs = run_model(result.path, original)
        assert outputs[0].shape == (1, 10)
        report = fw.download(job.id, "report.json", tmp_path / "out")
        assert json.loads(report.path.read_text()) == job.report

        with pytest.raises(NotFound):
            fw.get_job("0" * 32)
        with pytest.raises(NotFound):
            fw.download(job.id, "no-such-artifact", tmp_path / "out" / "x")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cnn.int8.onnx", "report.json"]

        if "/v1/jobs" in paths and "get" in httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/jobs"]:
            listed = fw.list_jobs(state="succeeded")
            assert job.id in [j.id for j in listed.jobs]
        if any(p.endswith(":cancel") for p in paths):
            second = fw.submit(model.id, recipe_path)
            cancelled = fw.cancel(second.id)
            assert cancelled.state in ("cancelled", "running", "succeeded")
            assert fw.wait(second.id, timeout=JOB_TIMEOUT_S).done


def test_job_serves_a_self_contained_report_html(live_server, onnx_models, tmp_path):
    model_path = tmp_path / "mlp.onnx"
    model_path.write_bytes(onnx_models.mlp().SerializeToString())
    with Client(live_server.url, timeout=30) as fw:
        job = fw.wait(fw.submit(fw.upload_model(model_path).id, RECIPE_YAML).id, timeout=JOB_TIMEOUT_S)
        assert job.succeeded, f"{job.error}\n{live_server.logs()}"
        assert job.artifact("report.html") is not None, (
            "the job has no report.html: the runner must write workdir/report.html with "
            "worker.pipeline.report_html.render_html(report, title=...)")
        page = fw.download(job.id, "report.html", tmp_path).path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert f"{job.report['size_ratio']:.2f}\u00d7" in page
    assert "<title>mlp.onnx: compression report</title>" in page      # titled by the uploaded file's name


# ------------------------------------------------------------------------------ the CLI


def cli_module() -> str:
    """featherweight.cli once it registers the remote commands; featherweight.remote_cmds until then."""
    from featherweight import cli

    try:
        cli.build_parser().parse_args(["status", "x"])
    except SystemExit:
        return "featherweight.remote_cmds"
    return "featherweight.cli"


def featherweight(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", cli_module(), *args], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S + 60, cwd=cwd or REPO_ROOT, env=subprocess_env(env or {}))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("featherweight: error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_submit_wait_status_download(live_server, onnx_models, tmp_path):
    url = live_server.url
    original = onnx_models.mlp()
    (tmp_path / "mlp.onnx").write_bytes(original.SerializeToString())
    (tmp_path / "r.yaml").write_text(RECIPE_YAML)

    done = featherweight("submit", "mlp.onnx", "--recipe", "r.yaml", "--server", url, "--wait",
                         "-o", "small.onnx", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr + live_server.logs()
    job = json.loads(done.stdout)
    assert job["state"] == "succeeded" and job["report"]["size_ratio"] > 1.0
    assert "upload mlp.onnx" in done.stderr and f"job {job['id']} succeeded" in done.stderr
    run_model(tmp_path / "small.onnx", original)

    # The server from the environment, the human form of status.
    status = featherweight("status", job["id"], env={"FEATHERWEIGHT_SERVER": url})
    assert status.returncode == 0 and f"job {job['id']}: succeeded 100%" in status.stdout
    assert "report: size " in status.stdout
    status_json = featherweight("status", job["id"], "--server", url, "--json")
    assert json.loads(status_json.stdout)["id"] == job["id"]

    fetched = featherweight("download", job["id"], "-o", str(tmp_path / "r.json"), "--artifact", "report.json",
                            "--server", url, "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["verified"] is True
    assert json.loads((tmp_path / "r.json").read_text()) == job["report"]

    queued = featherweight("submit", "mlp.onnx", "--recipe", "r.yaml", "--server", url, "-q", cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    waited = featherweight("wait", job_id, "--server", url, "--json", "--timeout", str(JOB_TIMEOUT_S))
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "succeeded"


def test_cli_bad_input_is_one_line_and_exit_2(live_server, onnx_models, tmp_path):
    url = live_server.url
    (tmp_path / "mlp.onnx").write_bytes(onnx_models.mlp().SerializeToString())
    (tmp_path / "bad.yaml").write_text("steps:\n  - op: prune\n    sparsity: 1.5\n")
    (tmp_path / "r.yaml").write_text(RECIPE_YAML)
    (tmp_path / "junk.onnx").write_bytes(b"PK\x03\x04 not a model")

    assert_one_line_error(featherweight("submit", "mlp.onnx", "--recipe", "bad.yaml", "--server", url, cwd=tmp_path),
                          "bad.yaml", "steps.0.sparsity")
    assert_one_line_error(featherweight("submit", "nope.onnx", "--recipe", "r.yaml", "--server", url, cwd=tmp_path),
                          "nope.onnx")
    assert_one_line_error(featherweight("submit", "junk.onnx", "--recipe", "r.yaml", "--server", url, "-q",
                                        cwd=tmp_path), "[HTTP 4")
    assert_one_line_error(featherweight("status", "no-such-job", "--server", url), "not found", "[HTTP 404]")
    assert_one_line_error(featherweight("download", "no-such-job", "-o", str(tmp_path / "x.onnx"), "--server", url),
                          "[HTTP 404]")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_and_client_when_the_server_is_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    (tmp_path / "m.onnx").write_bytes(b"bytes")
    (tmp_path / "r.yaml").write_text(RECIPE_YAML)
    for args in (("status", "j1"), ("wait", "j1"), ("download", "j1", "-o", "out.onnx"),
                 ("submit", "m.onnx", "--recipe", "r.yaml")):
        result = featherweight(*args, "--server", url, cwd=tmp_path)
        assert_one_line_error(result, f"cannot connect to {url}", "is the server running?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.yaml"]
    assert_one_line_error(featherweight("status", "j1", env={"FEATHERWEIGHT_SERVER": "localhost:8000"}),
                          "not an http:// or https:// URL")
    with Client(url, retries=0) as fw, pytest.raises(ServerUnavailable):
        fw.get_job("j1")
