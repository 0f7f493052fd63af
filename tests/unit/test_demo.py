"""featherweight.demo (`make demo`): the classifier it trains is a real one, written as a valid ONNX
model that ONNX Runtime runs to the same predictions; the demo runs a job to the end against the
API (the job executed in process, as a worker would) and prints the headline figures and where
report.html is; with no server it says, in one line, to start one."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from featherweight import demo
from featherweight.client import Client

pytest.importorskip("sklearn")


def test_the_demo_model_is_trained_and_runs_in_onnx_runtime(tmp_path):
    files = demo.build(tmp_path)
    assert files.test_accuracy > 0.9          # chance is 0.1
    model = onnx.load(str(files.model))
    onnx.checker.check_model(model, full_check=True)
    with np.load(files.evaluation) as evaluation:
        pixels, labels = evaluation["pixels"], evaluation["_labels"]
    assert pixels.shape == (files.test_samples, 64) and labels.shape == (files.test_samples,)
    logits = ort.InferenceSession(str(files.model), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert np.mean(np.argmax(logits, axis=1) == labels) == pytest.approx(files.test_accuracy)


class InProcessWorker(Client):
    """A client whose wait first runs the job here, as `make run`'s worker would."""

    def wait(self, job_id, *args, **kwargs):
        from worker.tasks import execute_job

        execute_job(job_id, worker="demo-test")
        return super().wait(job_id, *args, **kwargs)


def test_the_demo_runs_a_job_and_prints_the_headline_and_report_path(api_client, tmp_path):
    out, progress = io.StringIO(), io.StringIO()
    status = demo.run(InProcessWorker(http=api_client), tmp_path / "demo", "http://testserver", out, progress)
    assert status == 0, progress.getvalue()
    lines = out.getvalue().splitlines()
    report_line = next(line for line in lines if line.startswith("report: "))
    for figure in ("size ", "transport ", "latency ", "cosine ", "accuracy "):
        assert figure in report_line, report_line
    html = tmp_path / "demo" / "report.html"
    assert any(str(html) in line and "/artifacts/report.html" in line for line in lines), lines
    assert html.read_text().startswith("<!DOCTYPE html>")
    onnx.checker.check_model(str(tmp_path / "demo" / "digits.light.onnx"), full_check=True)
    job_id = next(line.split()[2] for line in lines if line.startswith("submitted job "))
    report = api_client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()
    assert report["accuracy"]["original"] > 0.9 and report["size_ratio"] > 2
    assert [s["op"] for s in report["steps"]] == ["prune", "quantize"]


def test_without_a_server_the_demo_says_to_start_one(free_tcp_port, capsys):
    assert demo.main(["--server", f"http://127.0.0.1:{free_tcp_port}"]) == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and "make run" in error[0] and str(free_tcp_port) in error[0]
