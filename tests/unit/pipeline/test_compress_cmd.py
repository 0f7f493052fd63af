"""featherweight compress (featherweight.compress_cmd): success writes -o and --report; bad input
is one line naming the file and field, exit 2, nothing at -o."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from featherweight import compress_cmd
from tests.unit.pipeline import builders
from tests.conftest import require_torch


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compress_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(), str(model))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - op: quantize\n    weights: {bits: 8}\n")
    return {"model": model, "recipe": recipe, "out": tmp_path / "out.onnx", "report": tmp_path / "report.json"}


def test_compress_writes_model_and_report(files, capsys):
    code = compress_cmd.main(parse(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]),
                                   "--report", str(files["report"]), "--target", "cpu-x86"))
    assert code == 0
    onnx.checker.check_model(str(files["out"]), full_check=True)
    report = json.loads(files["report"].read_text())
    assert report["size_ratio"] >= 3.5
    assert json.loads(capsys.readouterr().out)["output"] == str(files["out"])
    assert sorted(p.name for p in files["out"].parent.iterdir()) == ["mlp.onnx", "out.onnx", "r.yaml", "report.json"]


def expect_bad_input(capsys, files, argv, file: Path, field: str):
    code = compress_cmd.main(parse(*argv))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"featherweight: error: {file}: " + (f"{field}: " if field else "")
    assert lines[0].startswith(prefix), lines[0]
    assert not files["out"].exists()
    assert not [p for p in files["out"].parent.iterdir() if p.name.startswith(".out.onnx")]


def test_bad_recipe_exit_2_nothing_written(files, capsys):
    files["recipe"].write_text("steps:\n  - op: quantize\n    weights: {bits: 3}\n")
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"])],
                     files["recipe"], "steps.0.weights.bits")


def test_recipe_needing_calibration_without_it(files, capsys):
    files["recipe"].write_text("steps:\n  - op: quantize\n    method: gptq\n    weights: {bits: 4, granularity: block}\n")
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"])],
                     files["recipe"], "steps.0.method")


def test_calibration_of_the_wrong_shape(files, capsys, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.zeros((8, 99), np.float32))
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "--calibration", str(cal),
                                     "-o", str(files["out"])], cal, "x")


def test_unreadable_npz_and_model(files, capsys, tmp_path):
    cal = tmp_path / "cal.npz"
    cal.write_bytes(b"not a zip")
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "--eval", str(cal),
                                     "-o", str(files["out"])], cal, "")
    # a damaged zip (its magic, then nothing) and a lone .npy: tracebacks (BadZipFile, TypeError) before
    damaged, single = tmp_path / "damaged.npz", tmp_path / "single.npy"
    damaged.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    np.save(single, np.zeros((8, 128), np.float32))
    for path in (damaged, single):
        expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "--calibration",
                                         str(path), "-o", str(files["out"])], path, "")
    files["model"].write_bytes(b"garbage" * 20)
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"])],
                     files["model"], "")


def test_external_data_output_is_renamed_with_the_model(files, capsys, monkeypatch):
    from worker.pipeline import graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    code = compress_cmd.main(parse(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"])))
    assert code == 0, capsys.readouterr().err
    data = files["out"].with_name("out.onnx.data")
    assert data.exists()
    model = onnx.load(str(files["out"]))          # loads its external data by the new name
    assert sum(t.ByteSize() for t in model.graph.initializer) > 30_000
    onnx.checker.check_model(str(files["out"]), full_check=True)


def test_report_html_is_written_beside_the_model(files, capsys):
    html = files["out"].with_name("report.html")
    code = compress_cmd.main(parse(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]),
                                   "--report-html", str(html)))
    assert code == 0
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "size ratio" in page.lower()
    assert "http://" not in page and "https://" not in page


def test_student_is_distilled_and_training_progress_is_reported(tmp_path, capsys):
    require_torch()
    from worker.pipeline import runner
    from core.recipe import parse_recipe

    teacher, student = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    onnx.save_model(builders.mlp(inputs=16, hidden=64, classes=4, seed=1), str(teacher))
    onnx.save_model(builders.mlp(inputs=16, hidden=8, classes=4, seed=2), str(student))
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    recipe = tmp_path / "kd.yaml"
    recipe.write_text("steps:\n  - op: distill\n    method: kd\n    epochs: 2\n    min_params: 0\n")
    out = tmp_path / "out.onnx"
    code = compress_cmd.main(parse(str(teacher), "--recipe", str(recipe), "--calibration", str(calibration),
                                   "--student", str(student), "-o", str(out)))
    assert code == 0, capsys.readouterr().err
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(out)).graph.initializer)
    assert params == 16 * 8 + 8 + 8 * 4 + 4          # the student's shape, not the teacher's

    stages: list[str] = []
    runner.run(teacher, parse_recipe(recipe.read_text()), calibration=dict(np.load(calibration)),
               workdir=tmp_path / "work", options={"student_model_path": student, "layer_errors": False},
               progress=lambda fraction, stage: stages.append(stage))
    assert any(stage.startswith("step 1/1: distill: epoch") for stage in stages), stages


def test_missing_student_file_is_bad_input(files, capsys, tmp_path):
    missing = tmp_path / "nope.onnx"
    expect_bad_input(capsys, files, (str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]),
                                     "--student", str(missing)), missing, "")


def test_cli_prints_the_notice_when_not_measured_on_the_target(files, capsys, monkeypatch):
    from worker.pipeline import host

    # this host, whatever it is, stands in for an x86 machine asked for cpu-arm
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu("model name\t: Test CPU\nflags\t: avx2\n", "x86_64"))
    code = compress_cmd.main(parse(str(files["model"]), "--recipe", str(files["recipe"]), "-o", str(files["out"]),
                                   "--target", "cpu-arm"))
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out)["target_match"] is False
    assert "featherweight: notice: Latency was not measured on the target's hardware: target cpu-arm" in captured.err


def test_goal_recipe_writes_model_and_next_best_candidates(files, capsys, tmp_path):
    from tests.unit.pipeline.fragile import fragile_mlp, inputs

    onnx.save_model(fragile_mlp(), str(files["model"]))
    files["recipe"].write_text("goal:\n  metric: cosine\n  max_drop: 0.001\n  time_budget_s: 120\n")
    np.savez(tmp_path / "c.npz", **inputs(64))
    np.savez(tmp_path / "e.npz", **inputs(32, seed=5))
    code = compress_cmd.main(parse(str(files["model"]), "--recipe", str(files["recipe"]), "--calibration",
                                   str(tmp_path / "c.npz"), "--eval", str(tmp_path / "e.npz"), "-o", str(files["out"]),
                                   "--report", str(files["report"])))
    assert code == 0
    report = json.loads(files["report"].read_text())
    assert report["goal"]["met"] and report["size_ratio"] > 1.5
    written = json.loads(capsys.readouterr().out)["also_written"]
    assert str(tmp_path / "out.candidate-1.onnx") in written
    onnx.checker.check_model(str(tmp_path / "out.candidate-1.onnx"), full_check=True)


def test_goal_naming_a_missing_output_is_exit_2_with_its_path(files, capsys, tmp_path):
    files["recipe"].write_text("goal:\n  metric: cosine\n  output: embeddings\n")
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 128), np.float32))
    expect_bad_input(capsys, files, [str(files["model"]), "--recipe", str(files["recipe"]), "--calibration",
                                     str(tmp_path / "c.npz"), "-o", str(files["out"])], files["recipe"], "goal.output")
