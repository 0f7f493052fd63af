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
