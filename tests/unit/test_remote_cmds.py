"""featherweight.remote_cmds: progress display, output forms and exit statuses, in process (the client
is pointed at the real API app or at httpx.MockTransport); the live-server runs are in tests/e2e."""
from __future__ import annotations

import io
import json

import httpx
import pytest

import featherweight.client as client_module
from featherweight import remote_cmds
from featherweight.client import Client, Job


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def job(state: str, progress: float, stage: str | None = None) -> Job:
    return Job.from_json({"id": "j1", "state": state, "progress": progress, "stage": stage or state})


def test_progress_off_a_terminal_prints_a_few_lines():
    stream = io.StringIO()
    progress = remote_cmds.Progress(stream)
    update = progress.transfer("upload m.onnx")
    for done in range(0, 1001, 1):
        update(done, 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("upload m.onnx [") and "100%" in lines[-1]
    assert "\r" not in stream.getvalue()

    stream = io.StringIO()
    progress = remote_cmds.Progress(stream)
    for p in (0.0, 0.0, 0.01, 0.05, 0.12, 0.13, 0.5):
        progress.job(job("running", p, "quantize"))
    progress.job(job("succeeded", 1.0))
    assert stream.getvalue().splitlines() == [
        "job j1 running quantize 0%", "job j1 running quantize 12%", "job j1 running quantize 50%",
        "job j1 succeeded 100%"]


def test_progress_on_a_terminal_redraws_one_line_and_ends_it():
    stream = Terminal()
    progress = remote_cmds.Progress(stream)
    progress.REDRAW_SECONDS = 0.0
    update = progress.transfer("download model")
    update(512, 1024)
    update(1024, 1024)
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 30 + "] 100%" in text
    quiet = io.StringIO()
    silent = remote_cmds.Progress(quiet, enabled=False)
    silent.transfer("x")(1, 2)
    silent.job(job("running", 0.5))
    assert quiet.getvalue() == ""


@pytest.fixture
def in_process(api_client, monkeypatch):
    """Every Client the CLI makes talks to the in-process app."""
    monkeypatch.setattr(client_module, "Client", lambda *a, **k: Client(http=api_client))
    return api_client


def test_submit_status_and_download_in_process(in_process, onnx_models, tmp_path, capsys, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(onnx_models.mlp().SerializeToString())
    (tmp_path / "r.json").write_text(json.dumps({"steps": [{"op": "quantize", "weights": {"bits": 8}}]}))
    monkeypatch.chdir(tmp_path)
    assert remote_cmds.main(["submit", "m.onnx", "--recipe", "r.json", "--json", "-q"]) == 0
    submitted = json.loads(capsys.readouterr().out)
    assert submitted["state"] == "queued"
    assert remote_cmds.main(["status", submitted["id"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {submitted['id']}: queued 0% (waiting: no live worker on queue 'cpu-x86')")
    assert remote_cmds.main(["download", submitted["id"], "-o", "out.onnx"]) == 2
    # The server's own detail, whatever its wording, on one line with the status.
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith("featherweight: error: ")
    assert submitted["id"] in error[0] and "model" in error[0] and error[0].endswith("[HTTP 404]")
    assert not (tmp_path / "out.onnx").exists()


def test_a_recipe_refused_locally_names_the_file_before_any_upload(in_process, onnx_models, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(onnx_models.mlp().SerializeToString())
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps:\n  - op: quantize\n    weights: {bits: 0}\n")
    code = remote_cmds.main(["submit", str(tmp_path / "m.onnx"), "--recipe", str(recipe)])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1
    assert captured.err.startswith(f"featherweight: error: {recipe}: invalid recipe: steps.0.weights.bits")
    assert "upload" not in captured.err
    assert in_process.get("/v1/jobs/none").status_code == 404  # the app is there; nothing was sent to it


def test_a_failed_job_exits_1_and_a_server_error_exits_1(monkeypatch, capsys):
    def handler(request):
        if request.url.path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "state": "failed", "progress": 0.3, "stage": "quantize",
                                             "error": {"detail": "kernel refused the block size"}})
        return httpx.Response(500, json={"title": "Internal error", "status": 500, "detail": "boom"})

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(client_module, "Client",
                        lambda *a, **k: Client(http=httpx.Client(transport=transport, base_url="http://fw.test")))
    assert remote_cmds.main(["wait", "j1", "-q"]) == 1
    captured = capsys.readouterr()
    assert "job j1: failed 30% (quantize)" in captured.out and "error: kernel refused the block size" in captured.out
    assert captured.err == "featherweight: error: job j1 failed: kernel refused the block size\n"
    assert remote_cmds.main(["status", "j2"]) == 1
    assert capsys.readouterr().err == "featherweight: error: boom [HTTP 500]\n"


def test_server_and_key_come_from_the_environment(monkeypatch):
    made = {}

    def fake_client(base_url, api_key=None, **kwargs):
        made.update(base_url=base_url, api_key=api_key)
        raise client_module.ServerUnavailable(None, "about:blank", "Server unreachable", "stop here")

    monkeypatch.setattr(client_module, "Client", fake_client)
    monkeypatch.setenv("FEATHERWEIGHT_SERVER", "https://fw.example:8443")
    monkeypatch.setenv("FEATHERWEIGHT_API_KEY", "env-key")
    assert remote_cmds.main(["status", "j1"]) == 2
    assert made == {"base_url": "https://fw.example:8443", "api_key": "env-key"}
    assert remote_cmds.main(["status", "j1", "--server", "http://other:1", "--api-key", "flag-key"]) == 2
    assert made == {"base_url": "http://other:1", "api_key": "flag-key"}


def test_status_prints_the_notice_when_not_measured_on_the_target():
    notice = "Latency was not measured on the target's hardware: target gpu, measured on x86_64"
    job = Job.from_json({"id": "j1", "state": "succeeded", "progress": 1.0, "stage": "done",
                         "report": {"size_ratio": 4.0, "target_match": False, "target_notice": notice}})
    assert f"  notice: {notice}" in remote_cmds._describe(job)
    matched = Job.from_json({"id": "j1", "state": "succeeded", "progress": 1.0, "stage": "done",
                             "report": {"size_ratio": 4.0, "target_match": True, "target_notice": None}})
    assert not any("notice" in line for line in remote_cmds._describe(matched))


def test_the_clis_export_formats_are_the_services():
    """remote_cmds restates core.exports.FORMATS so as not to import the service; they must agree."""
    from core.exports import FORMATS
    from featherweight.remote_cmds import EXPORT_FORMATS, parse_export_formats

    assert EXPORT_FORMATS == FORMATS
    assert parse_export_formats("ort, tflite") == ["ort", "tflite"]


def test_headline_quotes_no_emulated_latency():
    report = {"size_ratio": 3.9, "latency_ratio": 1.7, "fidelity": {"cosine": 0.9991}}
    assert remote_cmds._headline(report) == "size 3.90x, latency 1.70x, cosine 0.9991"
    emulated = {**report, "measured_on": {"architecture": "aarch64", "emulated": True}}
    assert remote_cmds._headline(emulated) == "size 3.90x, latency emulated (no figure), cosine 0.9991"
