"""worker.pipeline.host: where figures are measured (measured_on, target_match, the notice) and the
choices made from the host's CPU naming the feature they read."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from core.recipe import parse_recipe
from worker.pipeline import host, runner
from worker.pipeline.quantize import int8_storage
from worker.pipeline.report_html import render_html
from worker.pipeline.prune.channels import channel_block
from tests.unit.pipeline import builders

X86_VNNI = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni f16c\n\nprocessor\t: 1\n"
X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7402\nflags\t\t: fpu sse avx2 fma f16c\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimdhp asimddp i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"


def test_parse_x86_features():
    cpu = host.parse_cpu(X86_VNNI, "x86_64", cores=4)
    assert (cpu.arch, cpu.model, cpu.cores) == ("x86_64", "Intel(R) Xeon(R) Gold", 4)
    assert cpu.features == {"avx2": True, "fma": True, "avx512": True, "vnni": True, "amx_int8": False, "fp16": False,
                            "f16c": True}
    plain = host.parse_cpu(X86_AVX2, "x86_64")
    assert plain.has("avx2") and not plain.has("vnni") and not plain.has("avx512")


def test_parse_arm_features():
    cpu = host.parse_cpu(ARM, "aarch64", cores=2)
    assert cpu.arch == "aarch64" and cpu.model == "implementer 0x41 part 0xd0c"
    assert cpu.features == {"neon": True, "dotprod": True, "fp16": True, "i8mm": True, "sve": False}


def test_emulated_arm_reads_features_from_the_auxiliary_vector():
    """Under qemu-user /proc/cpuinfo is the x86 host's: its flags say nothing about the aarch64 CPU."""
    cpu = host.parse_cpu(X86_VNNI, "aarch64", hwcap_flags=frozenset({"asimd", "asimddp"}))
    assert cpu.features == {"neon": True, "dotprod": True, "fp16": False, "i8mm": False, "sve": False}
    assert cpu.model == "emulated aarch64 on Intel(R) Xeon(R) Gold"


def test_target_match_needs_the_targets_hardware_natively():
    x86, arm = host.parse_cpu(X86_VNNI, "x86_64"), host.parse_cpu(ARM, "aarch64")
    emulated_arm = host.parse_cpu(ARM, "aarch64", emulated=True)
    assert host.target_match("cpu-x86", "CPUExecutionProvider", x86)
    assert not host.target_match("cpu-arm", "CPUExecutionProvider", x86)
    assert host.target_match("cpu-arm", "CPUExecutionProvider", arm)
    assert not host.target_match("cpu-arm", "CPUExecutionProvider", emulated_arm)
    assert not host.target_match("gpu", "CPUExecutionProvider", x86)
    assert host.target_match("gpu", "CUDAExecutionProvider", x86)
    assert host.target_notice("cpu-x86", "CPUExecutionProvider", x86) is None
    notice = host.target_notice("cpu-arm", "CPUExecutionProvider", emulated_arm)
    assert "not measured on the target's hardware" in notice and "emulation" in notice
    assert "allow_target_mismatch" in host.target_notice("gpu", "CPUExecutionProvider", x86, allowed_mismatch=True)


def test_emulation_flag_from_environment(monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_EMULATED", "1")
    assert host._emulated("aarch64")
    monkeypatch.setenv("FEATHERWEIGHT_EMULATED", "0")
    assert not host._emulated("aarch64")


@pytest.mark.parametrize("text, unsigned, read", [(X86_AVX2, True, "vnni absent"), (X86_VNNI, False, "vnni present")])
def test_integer_weight_storage_names_the_feature_it_read(monkeypatch, text, unsigned, read):
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(text, "x86_64"))
    options: dict = {}
    assert int8_storage.unsigned_weights("cpu-x86", options) is unsigned
    [choice] = options[host.CHOICES_KEY]
    assert choice["choice"] == "int8 weight storage" and read in choice["read"]
    assert choice["value"] == int8_storage.storage_name(unsigned)


def test_channel_block_names_the_feature_it_read(monkeypatch):
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(X86_AVX2, "x86_64"))
    options: dict = {}
    assert channel_block("cpu-x86", options) == 8
    assert options[host.CHOICES_KEY] == [{"choice": "channel block", "value": 8,
                                          "read": "avx512 absent on this host's x86_64 CPU (AMD EPYC 7402)"}]
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(X86_VNNI, "x86_64"))
    assert channel_block("cpu-x86", {}) == 16


FAST = {"latency_runs": 3, "latency_budget_s": 1.0, "layer_errors": False, "fidelity_samples": 8}


def _run(tmp_path: Path, target: str, recipe: str = "steps:\n  - op: quantize\n    weights: {bits: 8}\n"):
    model = tmp_path / "mlp.onnx"
    onnx.save_model(builders.mlp(inputs=32, hidden=64, classes=4), str(model))
    return runner.run(model, parse_recipe(recipe), target=target, workdir=tmp_path / "out", options=dict(FAST)).report


def test_report_says_where_it_was_measured(tmp_path):
    native = host.cpu_info().arch
    report = _run(tmp_path, "cpu-x86")
    where = report["measured_on"]
    assert where["architecture"] == native and where["execution_provider"] == "CPUExecutionProvider"
    assert where["onnxruntime"] and where["cores"] >= 1 and isinstance(where["isa"], dict)
    assert report["target_match"] is (native == "x86_64" and not where["emulated"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["measured_on"] == where


def test_foreign_target_is_flagged_in_report_and_html(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "cpu_info", lambda: host.parse_cpu(X86_VNNI, "x86_64"))
    report = _run(tmp_path, "cpu-arm")
    assert report["target_match"] is False
    assert "target cpu-arm" in report["target_notice"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'class="notice"' in page and "not measured on the target&#x27;s hardware" in page
    matched = render_html({**report, "target_match": True, "target_notice": None}, title="t")
    assert 'class="notice"' not in matched
