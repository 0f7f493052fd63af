"""``featherweight serve`` stops everything it started: on SIGTERM/SIGINT, and when its worker dies."""
from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

pytestmark = [pytest.mark.e2e]


def _worker_pid(home, deadline_s: float = 90.0) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        connection = sqlite3.connect(home / "featherweight.db")
        try:
            row = connection.execute("SELECT pid FROM workers").fetchone()
        finally:
            connection.close()
        if row:
            return int(row[0])
        time.sleep(0.3)
    raise AssertionError("the worker wrote no heartbeat")


def _gone(pid: int, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_api_and_worker(embedded_service, sig):
    serve = embedded_service.processes[0][1]
    worker_pid = _worker_pid(embedded_service.home)
    serve.send_signal(sig)
    assert serve.wait(timeout=60) == 0, embedded_service.logs()
    assert _gone(worker_pid), f"worker {worker_pid} still running after serve exited"


def test_serve_stops_when_its_worker_dies(embedded_service):
    serve = embedded_service.processes[0][1]
    os.kill(_worker_pid(embedded_service.home), signal.SIGKILL)
    assert serve.wait(timeout=60) == 1, embedded_service.logs()
    assert "the worker exited" in embedded_service.logs()
