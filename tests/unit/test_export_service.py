"""Export formats through the service and the CLI: a job's formats are artifacts with their sha256,
listed on the job and downloadable by the same route; a format whose extra is not installed is
refused at submit (422 problem+json at body.recipe.export.<i>) and by the CLI (one line, exit 2)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import sqlalchemy as sa

import featherweight.client as client_module
from core import exports as core_exports
from featherweight import compress_cmd, remote_cmds
from featherweight.client import Client
from tests.unit.pipeline import builders

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


def _upload(api_client, model: onnx.ModelProto) -> str:
    response = api_client.post("/v1/models", files={"file": ("m.onnx", model.SerializeToString())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_jobs_export_formats_are_artifacts_listed_and_downloadable(api_client, migrated):
    from worker.tasks import execute_job

    model = builders.mlp(inputs=32, hidden=64, classes=4)
    model_id = _upload(api_client, model)
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": {**RECIPE, "export": ["onnx", "ort", "pytorch"]}})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert execute_job(job_id, worker="w") == "succeeded"
    job = api_client.get(f"/v1/jobs/{job_id}").json()
    artifacts = {a["name"]: a for a in job["artifacts"]}
    assert {"model", "model.ort", "model.required_operators_and_types.config", "model.pt",
            "model.state_dict.pt"} <= set(artifacts)
    assert job["report"]["exports"]["ort"]["state"] == "ok"
    download = api_client.get(artifacts["model.ort"]["url"])
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == artifacts["model.ort"]["sha256"] == download.headers["X-Checksum-SHA256"]
    assert {f["name"]: f["sha256"] for f in job["report"]["exports"]["ort"]["files"]}["model.ort"] == artifacts["model.ort"]["sha256"]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    session = ort.InferenceSession(download.content, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == (2, 4)


def test_a_format_without_its_extra_is_refused_at_submit(api_client, migrated, monkeypatch):
    monkeypatch.setattr(core_exports, "_installed", lambda module: module not in ("onnx2tf", "tensorflow"))
    model_id = _upload(api_client, builders.mlp(inputs=32, hidden=64, classes=4))
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": {**RECIPE, "export": ["onnx", "tflite"]}})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["errors"][0]["loc"] == ["body", "recipe", "export", 1]
    assert "featherweight[tflite]" in problem["errors"][0]["msg"] and "onnx2tf" in problem["errors"][0]["msg"]
    from core.db import get_engine

    with get_engine().connect() as connection:
        assert connection.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar_one() == 0


def test_submit_export_refused_exit_2(api_client, migrated, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(client_module, "Client", lambda *a, **k: Client(http=api_client))
    monkeypatch.setattr(core_exports, "_installed", lambda module: module != "ai_edge_litert")
    (tmp_path / "m.onnx").write_bytes(builders.mlp(inputs=32, hidden=64, classes=4).SerializeToString())
    (tmp_path / "r.json").write_text(json.dumps(RECIPE))
    code = remote_cmds.main(["submit", str(tmp_path / "m.onnx"), "--recipe", str(tmp_path / "r.json"),
                             "--export", "onnx,tflite", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "export" in err and "featherweight[tflite]" in err


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(inputs=32, hidden=64, classes=4), str(model))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - op: quantize\n    weights: {bits: 8}\n")
    return {"model": model, "recipe": recipe, "out": tmp_path / "small.onnx"}


def _compress(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    compress_cmd.add_arguments(parser)
    return compress_cmd.main(parser.parse_args(list(argv)))


def test_compress_export_writes_each_format_beside_the_output(files, capsys):
    code = _compress(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]),
                     "--export", "onnx,ort,pytorch")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    folder = files["out"].parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "mlp.onnx", "r.yaml", "small.onnx", "small.ort", "small.pt", "small.required_operators_and_types.config",
        "small.state_dict.pt"]
    assert summary["exports"]["ort"] == {"state": "ok", "files": [str(folder / "small.ort"),
                                                                   str(folder / "small.required_operators_and_types.config")]}


def test_compress_export_without_the_extra_exit_2(files, capsys, monkeypatch):
    monkeypatch.setattr(core_exports, "_installed", lambda module: module != "onnx2tf")
    files["recipe"].write_text("steps:\n  - op: quantize\n    weights: {bits: 8}\nexport: [onnx, tflite]\n")
    code = _compress(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"featherweight: error: {files['recipe']}: export.1: export 'tflite' needs the optional "
                             "extra 'featherweight[tflite]'")
    assert not files["out"].exists()
