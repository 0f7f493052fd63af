"""Subprocess fixtures for the end-to-end tests: start the service, wait until it is ready, and always
stop every process it started (its own session/process group: SIGTERM, then SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90
STOP_TIMEOUT_S = 25


class Service:
    """A set of subprocesses serving the API at ``url``; ``logs()`` returns their output for failure messages."""

    def __init__(self, url: str, log_dir: Path) -> None:
        self.url = url
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        self.processes.append((name, process))
        return process

    def logs(self, tail: int = 6000) -> str:
        parts = []
        for name, _ in self.processes:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
            parts.append(f"----- {name} -----\n{text[-tail:]}")
        return "\n".join(parts)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    pytest.fail(f"{name} exited with {process.returncode} before the service was ready\n{self.logs()}")
            try:
                response = httpx.get(f"{self.url}/ready", timeout=5)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        pytest.fail(f"service not ready after {READY_TIMEOUT_S} s: {last}\n{self.logs()}")

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test shows the logs of every service it used (a timed-out wait says nothing else)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Service):
                report.sections.append((f"service logs ({value.url})", value.logs()))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group this test created with start_new_session
    except ProcessLookupError:
        pass


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATHERWEIGHT_")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def embedded_service(tmp_path: Path) -> Iterator[Service]:
    """``featherweight serve`` alone, on a fresh FEATHERWEIGHT_HOME: SQLite, local artifacts, filesystem broker."""
    port = free_port()
    home = tmp_path / "home"
    service = Service(f"http://127.0.0.1:{port}", tmp_path)
    service.home = home  # type: ignore[attr-defined]
    env = subprocess_env({"FEATHERWEIGHT_HOME": str(home), "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "2"})
    try:
        service.start("serve", [sys.executable, "-m", "featherweight.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env)
        service.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture
def full_stack_service(full_stack: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    """uvicorn and ``featherweight worker --queue cpu-x86`` against Postgres + Redis + the S3 server."""
    port = free_port()
    service = Service(f"http://127.0.0.1:{port}", tmp_path)
    env = subprocess_env({**full_stack, "FEATHERWEIGHT_WORKER_HEARTBEAT_SECONDS": "2"})
    try:
        service.start("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                              "--port", str(port)], env)
        service.start("worker", [sys.executable, "-m", "featherweight.cli", "worker", "--queue", "cpu-x86"], env)
        service.wait_ready()
        yield service
    finally:
        service.stop()
