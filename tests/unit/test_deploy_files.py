"""docker-compose.yml, Dockerfile and .ci/run name only queues and settings the code knows."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.settings import Settings
from core.targets import QUEUES

ROOT = Path(__file__).resolve().parents[2]
SETTING = re.compile(r"\bFEATHERWEIGHT_([A-Z0-9_]+)\b")
TEST_ONLY = {"TEST_POSTGRES_URL", "TEST_REDIS_URL", "TEST_INTEGRATION"}


def _known_setting(name: str) -> bool:
    return name.lower() in Settings.model_fields


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _queue_of(command: list[str]) -> str | None:
    return command[command.index("--queue") + 1] if "--queue" in command else None


def test_compose_has_the_services_of_the_stack(compose):
    services = compose["services"]
    assert {"postgres", "redis", "minio", "migrate", "api", "worker-cpu"} <= set(services)
    assert services["worker-arm"]["profiles"] == ["arm"] and services["worker-arm"]["platform"] == "linux/arm64"
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["migrate"]["command"] == ["featherweight", "migrate"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_workers_cover_every_queue_and_only_known_ones(compose):
    queues = {name: _queue_of(service.get("command", [])) for name, service in compose["services"].items()
              if name.startswith("worker")}
    assert set(queues.values()) == set(QUEUES)
    assert queues == {"worker-cpu": "cpu-x86", "worker-arm": "cpu-arm", "worker-gpu": "gpu"}


def test_compose_settings_are_real_settings(compose):
    names = set()
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        for key in environment:
            match = SETTING.fullmatch(key)
            if match:
                names.add(match.group(1))
    assert {"DATABASE_URL", "BROKER_URL", "STORAGE", "S3_ENDPOINT_URL", "S3_BUCKET"} <= names
    unknown = sorted(n for n in names if not _known_setting(n))
    assert unknown == []
    environment = compose["services"]["api"]["environment"]
    Settings(**{k.removeprefix("FEATHERWEIGHT_").lower(): v for k, v in environment.items()
                if k.startswith("FEATHERWEIGHT_")})


def test_compose_build_targets_exist_in_the_dockerfile(compose):
    stages = {rest.split()[-1] for keyword, rest in dockerfile_instructions() if keyword == "FROM" and " AS " in rest.upper()}
    targets = {service["build"]["target"] for service in compose["services"].values() if "build" in service}
    assert targets == {"api", "worker", "worker-gpu"}
    assert targets <= stages
    assert {"builder", "builder-gpu", "runtime"} <= stages


def test_dockerfile_names_known_queues_and_settings():
    instructions = dockerfile_instructions()
    text = " ".join(rest for _, rest in instructions)
    unknown = sorted({n for n in SETTING.findall(text) if not _known_setting(n)})
    assert unknown == []
    commands = {}
    stage = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            stage = rest.split()[-1]
        if keyword == "CMD":
            commands[stage] = yaml.safe_load(rest)
    assert _queue_of(commands["worker"]) == "cpu-x86"
    assert _queue_of(commands["worker-gpu"]) == "gpu"
    assert commands["api"][:2] == ["uvicorn", "api.main:app"]
    assert any(keyword == "COPY" and "--from=builder " in rest + " " for keyword, rest in instructions)


def test_ci_script_sets_the_integration_settings():
    script = (ROOT / ".ci" / "run").read_text()
    names = set(SETTING.findall(script))
    assert {"TEST_POSTGRES_URL", "TEST_REDIS_URL"} <= names
    assert all(_known_setting(n) or n in TEST_ONLY for n in names)
    assert "make test" in script and "set -euo pipefail" in script
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111
    for line in script.splitlines():
        if line.strip().startswith(("pg_ctlcluster", "redis-server")):
            shlex.split(line)


def test_dockerignore_keeps_host_build_outputs_out_of_images():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "**/*.so", "kernels/_ffi.c"} <= patterns
    copied = {rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "COPY" and "--from" not in rest}
    assert not any(path.rstrip("/") in patterns for path in copied)


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_failed_torch_install_fails_make_under_ci_only(tmp_path, ci):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nexit 1\n")   # every pip install fails
    (fake / "python").chmod(0o755)
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "torch", f"BIN={fake}", f"CI={ci}"],
                            capture_output=True, text=True, timeout=60)
    if ci:
        assert result.returncode != 0 and "torch install failed" in result.stderr
    else:
        assert result.returncode == 0 and "torch not installed: distill method kd" in result.stdout


def test_readme_first_screen_has_the_commands_and_make_demo_exists():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    for command in ("make run", "make test", "make demo"):
        assert command in first_screen, command
    result = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", "BIN=.venv/bin", "PORT=8123"],
                            capture_output=True, text=True, timeout=60) if shutil.which("make") else None
    if result is not None:
        assert "-m featherweight.demo --server http://127.0.0.1:8123" in result.stdout, result.stdout + result.stderr
