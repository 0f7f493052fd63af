"""POST /v1/models with a .zip (one .onnx and its external data): accepted, stored whole, unpacked by the
worker; archives that escape, hold links, bombs or the wrong number of models are 422 and leave nothing."""
from __future__ import annotations

import io
import re
import os
import zipfile
from pathlib import Path

import onnx
import pytest
import sqlalchemy as sa

import worker.pipeline.runner as runner


def _external_model_files(tmp_path: Path, model: onnx.ModelProto, location: str = "weights.bin") -> dict[str, bytes]:
    folder = tmp_path / "exported"
    folder.mkdir(exist_ok=True)
    onnx.save_model(model, str(folder / "net.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return {"net.onnx": (folder / "net.onnx").read_bytes(), location: (folder / location).read_bytes()}


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


REASONS = {"two models": "exactly one .onnx", "no model": "exactly one .onnx", "escaping entry": "escapes",
           "escaping location": "not a plain relative path", "symlink": "not a regular file",
           "bomb": "compressed more than", "not a zip": "damaged|not a zip", "missing data file": "not part of the upload"}


def _left(home: Path) -> tuple[int, list[str]]:
    from core.db import get_engine

    with get_engine().connect() as connection:
        rows = connection.execute(sa.text("SELECT COUNT(*) FROM models")).scalar_one()
    files = []
    for folder in ("artifacts", "scratch"):
        if (home / folder).exists():
            files += [str(p) for p in (home / folder).rglob("*") if p.is_file()]
    return rows, files


def test_zip_with_external_data_is_accepted_stored_and_unpacked_by_the_worker(api_client, migrated, tmp_path,
                                                                              onnx_models, monkeypatch):
    files = _external_model_files(tmp_path, onnx_models.mlp())
    response = api_client.post("/v1/models", files={"file": ("net.zip", _zip(files))})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["params"] == 128 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert (migrated / "artifacts" / "models" / body["id"] / "model.zip").is_file()
    assert os.listdir(migrated / "scratch") == []

    seen = {}

    def fake_run(model_path, recipe, *, workdir, **_):
        seen["model"] = onnx.load(str(model_path))  # loads the external data beside it
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"m")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(runner, "run", fake_run)
    from worker.tasks import execute_job

    job_id = api_client.post("/v1/jobs", json={"model_id": body["id"], "recipe": {"steps": [{"op": "fp16"}]}}).json()["id"]
    assert execute_job(job_id, worker="w") == "succeeded"
    assert onnx.numpy_helper.to_array(seen["model"].graph.initializer[0]).shape == (128, 256)


@pytest.mark.parametrize("case", ["two models", "no model", "escaping entry", "escaping location", "symlink",
                                  "bomb", "not a zip", "missing data file"])
def test_bad_archive_is_422_and_leaves_nothing(api_client, migrated, tmp_path, onnx_models, case):
    files = _external_model_files(tmp_path, onnx_models.mlp())
    if case == "two models":
        payload = _zip({**files, "other.onnx": files["net.onnx"]})
    elif case == "no model":
        payload = _zip({"weights.bin": files["weights.bin"]})
    elif case == "escaping entry":
        payload = _zip({**files, "../evil.bin": b"x"})
    elif case == "escaping location":
        model = onnx.load_from_string(files["net.onnx"])  # external references kept, data not loaded
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../../weights.bin"
        payload = _zip({"net.onnx": model.SerializeToString(), "weights.bin": files["weights.bin"]})
    elif case == "symlink":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("net.onnx", files["net.onnx"])
            link = zipfile.ZipInfo("weights.bin")
            link.external_attr = 0o120777 << 16
            archive.writestr(link, "/etc/passwd")
        payload = buffer.getvalue()
    elif case == "bomb":
        payload = _zip({**files, "pad.bin": b"\0" * (64 * 1024 * 1024)})
    elif case == "not a zip":
        payload = b"PK\x03\x04" + b"\x00" * 100
    else:
        payload = _zip({"net.onnx": files["net.onnx"]})
    response = api_client.post("/v1/models", files={"file": ("net.zip", payload)})
    assert response.status_code == 422, (case, response.text)
    assert response.json()["type"].endswith("/invalid-model")
    assert re.search(REASONS[case], response.json()["detail"]), (case, response.json()["detail"])
    assert _left(migrated) == (0, [])


def test_a_zip_of_a_folder_with_its_directory_entries_is_accepted(api_client, migrated, tmp_path, onnx_models):
    """``zip -r model.zip exported/`` writes the folder's own entry: it was refused as not a regular
    file. A folder entry carries nothing and is skipped; one that escapes is still refused."""
    files = _external_model_files(tmp_path, onnx_models.mlp())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("exported/"), b"")
        for name, data in files.items():
            archive.writestr(f"exported/{name}", data)
    response = api_client.post("/v1/models", files={"file": ("net.zip", buffer.getvalue())})
    assert response.status_code == 201, response.text
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr(zipfile.ZipInfo("../up/"), b"")
        for name, data in files.items():
            archive.writestr(name, data)
    assert api_client.post("/v1/models", files={"file": ("bad.zip", escaping.getvalue())}).status_code == 422
