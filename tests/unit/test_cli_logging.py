"""The CLI's stderr holds only its own lines: the HTTP client's per-request INFO log lines
(``INFO httpx: HTTP Request: POST ...``) appear with ``-v`` only. Run as a subprocess, because the
logging set-up under test is the console script's own, not pytest's."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Refuse(BaseHTTPRequestHandler):
    """Answers every request with a 401 problem, as a server requiring a key would."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"type": "about:blank", "title": "Unauthorized", "status": 401,
                           "detail": "an API key is required"}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/problem+json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:   # keep the test's output clean
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "featherweight.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_submit_and_status_print_no_http_log_lines_unless_verbose(refusing_server, onnx_models, tmp_path, verbose):
    (tmp_path / "m.onnx").write_bytes(onnx_models.mlp().SerializeToString())
    (tmp_path / "r.json").write_text(json.dumps({"steps": [{"op": "quantize", "weights": {"bits": 8}}]}))
    for command in (["submit", "m.onnx", "--recipe", "r.json"], ["status", "some-job"]):
        result = _cli(*command, "--server", refusing_server, *verbose, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("featherweight: error: ")]
        assert len(errors) == 1 and errors[0].endswith("[HTTP 401]"), result.stderr
        requests = [line for line in result.stderr.splitlines() if "HTTP Request:" in line]
        if verbose:
            method = "POST" if command[0] == "submit" else "GET"
            assert any(f"{method} {refusing_server}/v1/" in line for line in requests), result.stderr
        else:
            assert requests == [] and "httpx" not in result.stderr, result.stderr
