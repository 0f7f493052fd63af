"""bench/gpu.sh and bench.gpu: the script parses, its Python part runs on a CPU with --dry-run (every
gpu row flagged, never a figure), and without a GPU the real run refuses instead of timing the CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bench import gpu
from tests.unit.pipeline import builders

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "bench" / "gpu.sh"


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    model, calibration = tmp_path / "mlp.onnx", tmp_path / "cal.npz"
    onnx.save_model(builders.mlp(inputs=64, hidden=64, classes=4), str(model))
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    return model, calibration


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_script_dry_run_runs_every_recipe_on_the_cpu(tiny, tmp_path):
    model, calibration = tiny
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--", "--model", str(model), "--calibration",
                           str(calibration), "--runs", "2", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPU ratio" in done.stdout and "dry run" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["recipe"] for row in rows] == ["fp16", "int8", "int4"]
    for row in rows:
        assert row["gpu"]["target_match"] is False and row["gpu"]["provider"] == "CPUExecutionProvider"
        assert row["cpu"]["latency_ratio"] > 0 and row["gpu"]["rel_l2"] < 0.5


def test_real_run_refuses_without_a_gpu(tiny, capsys, monkeypatch):
    monkeypatch.setattr(gpu, "gpu_check", lambda: "no CUDA-capable device is detected")
    model, calibration = tiny
    assert gpu.main(["--model", str(model), "--calibration", str(calibration)]) == 2
    assert "a gpu worker would not start here: no CUDA-capable device" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA GPU may be here")
def test_script_without_nvidia_gpu_is_exit_2():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no NVIDIA GPU here" in done.stderr


def test_int4_recipe_names_matmul_weights_only():
    recipe = gpu.recipe_for("int4", builders.mlp(inputs=64, hidden=64, classes=4))
    assert recipe["steps"][0]["include"] == ["fc1", "fc2"]
    assert gpu.recipe_for("int4", builders.cnn_bn()) is None
