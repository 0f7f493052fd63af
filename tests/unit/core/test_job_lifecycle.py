"""worker.tasks.execute_job: the job lifecycle around the pipeline (pipeline replaced by fakes here;
tests/e2e runs the real one)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import worker.pipeline.runner as runner
from core.db import session_scope
from core.errors import RecipeError
from core.models import JobState
from core.repos import ArtifactRepo, JobRepo, ModelRepo
from core.storage import get_store
from tests.unit.core.stored_jobs import stored_job
from worker.tasks import CancelProbe, ThrottledProgress, execute_job, json_safe

RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8}}]}


@pytest.fixture
def job_id(migrated, tmp_path, onnx_models) -> str:
    return stored_job(tmp_path, onnx_models.mlp(), RECIPE, "cpu-x86")


def _job(job_id):
    with session_scope() as session:
        job = JobRepo(session).get(job_id)
        return job, ArtifactRepo(session).list_for_job(job_id), [(e.kind, e.stage) for e in JobRepo(session).events(job_id)]


def _objects(home: Path) -> list[str]:
    root = home / "artifacts" / "jobs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_success_stores_artifacts_with_sha256_and_report(job_id, migrated, monkeypatch):
    seen = {}

    def fake_run(model_path, recipe, *, calibration, evaluation, target, workdir, progress, cancelled, options):
        seen.update(model=Path(model_path).read_bytes()[:4], op=recipe.steps[0].op, target=target)
        progress(0.1, "step 1/1: quantize")
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"compressed")
        (workdir / "report.json").write_text(json.dumps({"size_ratio": 3.9}))
        (workdir / "report.html").write_text("<html></html>")
        assert not cancelled()
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={"size_ratio": 3.9, "nan": float("nan")})

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "succeeded"
    job, artifacts, events = _job(job_id)
    assert seen == {"model": seen["model"], "op": "quantize", "target": "cpu-x86"} and seen["model"]
    assert job.state == "succeeded" and job.progress == 1.0
    assert job.report == {"size_ratio": 3.9, "nan": None}
    by_name = {a.name: a for a in artifacts}
    assert set(by_name) == {"model", "report.json", "report.html"}
    assert by_name["model"].sha256 == hashlib.sha256(b"compressed").hexdigest() and by_name["model"].bytes == 10
    assert _objects(migrated) == [f"{job_id}/1/model.onnx", f"{job_id}/1/report.html", f"{job_id}/1/report.json"]
    assert ("stage", "step 1/1: quantize") in events
    assert list((migrated / "scratch").iterdir()) == []


def test_second_delivery_does_not_run_again(job_id, monkeypatch):
    calls = []

    def fake_run(model_path, recipe, *, workdir, **_):
        calls.append(1)
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"m")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "succeeded"
    assert execute_job(job_id, worker="w2") == "succeeded"
    assert calls == [1]
    _, artifacts, _ = _job(job_id)
    assert [a.name for a in artifacts] == ["model"]


def test_recipe_error_marks_failed_with_problem_and_leaves_no_objects(job_id, migrated, monkeypatch):
    def fake_run(model_path, recipe, **_):
        raise RecipeError("invalid recipe: steps.0.method: needs calibration data",
                          [{"loc": ["steps", 0, "method"], "msg": "needs calibration data"}])

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "failed"
    job, artifacts, _ = _job(job_id)
    assert job.error["type"].endswith("/invalid-recipe")
    assert job.error["errors"] == [{"loc": ["steps", 0, "method"], "msg": "needs calibration data"}]
    assert artifacts == [] and _objects(migrated) == []
    assert list((migrated / "scratch").iterdir()) == []


def test_unexpected_exception_marks_failed(job_id, monkeypatch):
    def fake_run(model_path, recipe, **_):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "failed"
    job, _, _ = _job(job_id)
    assert job.error["type"].endswith("/pipeline-failed")
    assert job.error["detail"] == "ZeroDivisionError: division by zero"


def test_job_moved_out_of_running_stops_without_artifacts(job_id, migrated, monkeypatch):
    from worker.pipeline.step import StepCancelled

    def fake_run(model_path, recipe, *, cancelled, **_):
        with session_scope() as session:
            JobRepo(session).transition(job_id, JobState.CANCELLED)
        if cancelled():
            raise StepCancelled("job cancelled")
        raise AssertionError("the cancel probe did not see the cancelled state")

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "cancelled"
    assert _objects(migrated) == []


def test_upload_failure_after_pipeline_fails_the_job_and_cleans_up(job_id, migrated, monkeypatch):
    store = get_store()
    original_put = store.put_file

    def flaky_put(key, path, content_type="application/octet-stream"):
        if key.endswith("report.json"):
            raise OSError("disk full")
        original_put(key, path, content_type)

    def fake_run(model_path, recipe, *, workdir, **_):
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"m")
        (workdir / "report.json").write_text("{}")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(store, "put_file", flaky_put)
    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1", store=store) == "failed"
    assert _objects(migrated) == []
    job, artifacts, _ = _job(job_id)
    assert artifacts == [] and "disk full" in job.error["detail"]


def test_throttled_progress_writes_on_stage_change_or_interval(monkeypatch):
    writes = []
    monkeypatch.setattr("worker.tasks._progress", lambda job_id, f, s: writes.append((round(f, 2), s)))
    now = [0.0]
    progress = ThrottledProgress("j", 0.5, clock=lambda: now[0])
    for t, fraction, stage in [(0.0, 0.1, "a"), (0.1, 0.2, "a"), (0.2, 0.3, "b"), (0.3, 0.4, "b"), (0.8, 0.5, "b")]:
        now[0] = t
        progress(fraction, stage)
    assert writes == [(0.1, "a"), (0.3, "b"), (0.5, "b")]


def test_cancel_probe_reads_state_at_most_every_interval(monkeypatch):
    reads = []
    states = iter(["running", "cancelled"])
    monkeypatch.setattr("worker.tasks._current_state", lambda job_id: reads.append(1) or next(states))
    now = [0.0]
    probe = CancelProbe("j", interval=2.0, clock=lambda: now[0])
    assert probe() is False
    now[0] = 1.0
    assert probe() is False and len(reads) == 1
    now[0] = 2.5
    assert probe() is True and probe() is True and len(reads) == 2


def test_json_safe_turns_numpy_and_nonfinite_into_json():
    import numpy as np

    assert json_safe({"a": np.float32(1.5), "b": [np.int64(2), float("inf")], "c": (None, "x")}) == {
        "a": 1.5, "b": [2, None], "c": [None, "x"]}


def test_data_sets_and_distill_student_reach_the_pipeline(migrated, tmp_path, onnx_models, monkeypatch):
    import numpy as np
    import onnx

    from core.repos import DatasetRepo

    store = get_store()
    mlp = tmp_path / "m.onnx"
    mlp.write_bytes(onnx_models.mlp().SerializeToString())
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.ones((3, 128), np.float32))
    for key, path in (("models/t/model.onnx", mlp), ("models/s/model.onnx", mlp), ("datasets/c/data.npz", cal)):
        store.put_file(key, path)
    with session_scope() as session:
        models = ModelRepo(session)
        for model_id in ("t", "s"):
            models.create(id=model_id, filename="m.onnx", sha256="0" * 64, bytes=1, params=1, opset=17, ir_version=8,
                          inputs=[], outputs=[], storage_key=f"models/{model_id}/model.onnx")
        DatasetRepo(session).create(id="c", filename="c.npz", sha256="0" * 64, bytes=1, arrays=[],
                                    storage_key="datasets/c/data.npz")
        recipe = {"steps": [{"op": "distill", "student_model_id": "s"}]}
        job_id = JobRepo(session).create("t", recipe, "cpu-x86", calibration_dataset_id="c", eval_dataset_id="c").id
    seen = {}

    def fake_run(model_path, recipe, *, calibration, evaluation, options, workdir, **_):
        seen.update(cal=calibration, ev=evaluation, student=onnx.load(str(options["student_model_path"])))
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"m")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "succeeded"
    assert set(seen["cal"]) == {"x"} and seen["cal"]["x"].shape == (3, 128) and seen["ev"]["x"].sum() == 384
    assert seen["student"].graph.name == "mlp"


def test_a_deleted_data_set_fails_the_job_clearly(job_id, monkeypatch):
    from core.models import Job
    from core.repos import DatasetRepo

    with session_scope() as session:
        DatasetRepo(session).create(id="gone", filename="c.npz", sha256="0" * 64, bytes=1, arrays=[],
                                    storage_key="datasets/gone/data.npz")
        session.query(Job).filter(Job.id == job_id).update({Job.calibration_dataset_id: "gone"})
        DatasetRepo(session).mark_deleted("gone")
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("must not run"))
    assert execute_job(job_id, worker="w1") == "failed"
    job, _, _ = _job(job_id)
    assert job.error["type"].endswith("/not-found") and "gone" in job.error["detail"]


def test_sensitivity_and_goal_candidates_are_stored_as_artifacts(job_id, migrated, monkeypatch):
    def fake_run(model_path, recipe, *, workdir, **_):
        workdir.mkdir(parents=True)
        (workdir / "model.onnx").write_bytes(b"chosen")
        (workdir / "report.json").write_text("{}")
        (workdir / "sensitivity.json").write_text('{"steps": []}')
        (workdir / "candidate-1.onnx").write_bytes(b"next best")
        (workdir / "candidate-2.onnx").write_bytes(b"third")
        return runner.PipelineResult(model_path=workdir / "model.onnx", report={})

    monkeypatch.setattr(runner, "run", fake_run)
    assert execute_job(job_id, worker="w1") == "succeeded"
    _, artifacts, _ = _job(job_id)
    by_name = {a.name: a for a in artifacts}
    assert set(by_name) == {"model", "report.json", "sensitivity.json", "candidate-1", "candidate-2"}
    assert by_name["candidate-1"].sha256 == hashlib.sha256(b"next best").hexdigest()
