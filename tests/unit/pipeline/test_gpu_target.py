"""gpu never silently becomes CPU: refused where CUDA cannot run a model (for real on this CUDA-less
host, and with the CUDA check mocked at its boundary), unless the request allows the mismatch, which
the report states; the fp16 kernels checked in the CUDA provider (TensorRT's QDQ form:
quantize/test_tensorrt_qdq.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
import pytest

from core.errors import TargetUnavailable
from core.recipe import parse_recipe
from featherweight import compress_cmd
from worker.pipeline import host, runner, sessions
from worker.pipeline.step import StepContext
from tests.unit.pipeline import builders

FAST = {"latency_runs": 3, "latency_budget_s": 1.0, "layer_errors": False, "fidelity_samples": 8}
RECIPE = "steps:\n  - op: quantize\n    weights: {bits: 8}\n"


@pytest.fixture
def cuda_less():
    """This host, for real: skip where CUDA happens to run."""
    host.cuda_problem.cache_clear()
    if host.cuda_problem() is not None:
        yield
    else:
        pytest.skip("CUDA runs on this host")
    host.cuda_problem.cache_clear()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(inputs=32, hidden=64, classes=4), str(path))
    return path


def test_probe_really_runs_a_model_here_and_fails_without_cuda(cuda_less):
    problem = host.probe_cuda()
    assert problem and "CUDAExecutionProvider" in problem
    assert host.probe_cuda_isolated() == problem          # the child process sees the same
    assert host.provider_for("gpu") == "CPUExecutionProvider"


def test_a_listed_provider_is_not_proof(monkeypatch):
    """onnxruntime-gpu on a machine without a driver lists CUDA; the probe must still fail."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    problem = host.probe_cuda()
    if problem is None:
        pytest.skip("CUDA runs on this host")
    assert problem.startswith("CUDAExecutionProvider cannot run a model here") or "did not start" in problem


def test_runner_refuses_gpu_before_any_work(cuda_less, model_file, tmp_path):
    with pytest.raises(TargetUnavailable) as caught:
        runner.run(model_file, parse_recipe(RECIPE), target="gpu", workdir=tmp_path / "out", options=dict(FAST))
    assert caught.value.errors[0]["loc"] == ["target"] and caught.value.status == 422
    assert "target gpu needs CUDA" in caught.value.detail and "--allow-target-mismatch" in caught.value.detail
    assert not (tmp_path / "out").exists()


def test_runner_with_mocked_cuda_does_not_refuse(monkeypatch):
    monkeypatch.setattr(host, "cuda_problem", lambda: None)
    host.require_target("gpu")
    assert host.provider_for("gpu") == "CUDAExecutionProvider"
    monkeypatch.setattr(host, "cuda_problem", lambda: "no CUDA-capable device is detected")
    with pytest.raises(TargetUnavailable, match="no CUDA-capable device"):
        host.require_target("gpu")
    host.require_target("gpu", allow_mismatch=True)
    host.require_target("cpu-x86")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compress_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_gpu_without_cuda_is_exit_2_one_line(cuda_less, model_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out.onnx"
    assert compress_cmd.main(_parse(str(model_file), "--recipe", str(recipe), "--target", "gpu", "-o", str(out))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featherweight: error: --target: target gpu needs CUDA")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "r.yaml"]


def test_cli_allow_target_mismatch_runs_and_the_report_says_so(cuda_less, model_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = compress_cmd.main(_parse(str(model_file), "--recipe", str(recipe), "--target", "gpu", "-o", str(out),
                                    "--report", str(report_path), "--allow-target-mismatch"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(report_path.read_text())
    assert report["target"] == "gpu" and report["provider"] == "CPUExecutionProvider"
    assert report["target_match"] is False and report["target_mismatch_allowed"] is True
    assert "allow_target_mismatch" in report["target_notice"]
    assert "featherweight: notice: Latency was not measured on the target's hardware: target gpu" in captured.err


class _SessionSpy:
    def __init__(self, monkeypatch):
        self.providers: list[str] = []
        real = sessions.exposed_session

        def spy(model, names, provider="CPUExecutionProvider"):
            self.providers.append(provider)
            return real(model, names, "CPUExecutionProvider")   # this host has no CUDA to run it on
        monkeypatch.setattr(sessions, "exposed_session", spy)


@pytest.mark.parametrize("target, cuda, provider", [("gpu", None, "CUDAExecutionProvider"),
                                                     ("cpu-x86", None, "CPUExecutionProvider"),
                                                     ("gpu", "no device", "CPUExecutionProvider")])
def test_fp16_checks_kernels_in_the_targets_provider(monkeypatch, target, cuda, provider):
    from worker.pipeline.steps import fp16

    monkeypatch.setattr(host, "cuda_problem", lambda: cuda)
    spy = _SessionSpy(monkeypatch)
    model = builders.mlp(inputs=16, hidden=32, classes=4)
    result = fp16.run(model, parse_recipe("steps:\n  - op: fp16\n").steps[0], StepContext(original=model, target=target))
    # the float32 model's ranges are measured on the CPU; the float16 kernel checks in the target's provider
    assert spy.providers[-1] == provider and set(spy.providers) <= {provider, "CPUExecutionProvider"}
    assert result.metrics["kernels_checked_in"] == provider
