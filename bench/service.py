"""Service load bench: concurrent clients submitting and polling over loopback, overload, upload memory.

    .venv/bin/python -m bench.service [--clients 32] [--jobs 4] [--polls 10] [--stream-mb 512]

Starts the API (uvicorn, one process) on a fresh embedded FEATHERWEIGHT_HOME (SQLite, local store,
filesystem broker; no worker, so jobs stay queued and only the API is measured), then:

1. load: ``--clients`` threads each submit ``--jobs`` jobs and poll each job's status ``--polls``
   times: submit and status latency p50 / p99, and any status other than 202 / 200;
2. overload: the API restarted with FEATHERWEIGHT_API_MAX_INFLIGHT=4 and hit by 4x ``--clients``
   concurrent status requests: how many were answered 200, how many 503 (with Retry-After), and
   how many timed out or failed (the promise: 0);
3. upload memory: the API's peak RSS (VmHWM) before and after streaming a ``--stream-mb`` MB upload
   (an .onnx of junk: received, hashed, validated in the helper process, refused with 422).

Prints one JSON object with the figures. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Api:
    def __init__(self, home: Path, extra: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEATHERWEIGHT_")}
        env.update({"FEATHERWEIGHT_HOME": str(home), "PYTHONPATH": str(ROOT), **(extra or {})})
        subprocess.run([sys.executable, "-m", "featherweight.cli", "migrate"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", "--backlog", "2048"], cwd=ROOT, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the API did not start")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def _model_bytes() -> bytes:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_mlp

    return build_mlp().SerializeToString()


def load(api: Api, clients: int, jobs: int, polls: int) -> dict:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", _model_bytes())}).json()["id"]
    submit_s: list[float] = []
    status_s: list[float] = []
    unexpected: list[int] = []
    lock = threading.Lock()

    def one_client() -> None:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            for _ in range(jobs):
                start = time.perf_counter()
                response = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
                elapsed = time.perf_counter() - start
                with lock:
                    submit_s.append(elapsed)
                    if response.status_code != 202:
                        unexpected.append(response.status_code)
                if response.status_code != 202:
                    continue
                job_id = response.json()["id"]
                etag = None
                for _ in range(polls):
                    start = time.perf_counter()
                    headers = {"If-None-Match": etag} if etag else {}
                    response = client.get(f"/v1/jobs/{job_id}", headers=headers)
                    elapsed = time.perf_counter() - start
                    etag = response.headers.get("etag", etag)
                    with lock:
                        status_s.append(elapsed)
                        if response.status_code not in (200, 304):
                            unexpected.append(response.status_code)

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "submits": len(submit_s), "status_requests": len(status_s),
            "submit_ms": {"p50": _pct(submit_s, 0.5), "p99": _pct(submit_s, 0.99)},
            "status_ms": {"p50": _pct(status_s, 0.5), "p99": _pct(status_s, 0.99)},
            "requests_per_s": round((len(submit_s) + len(status_s)) / wall, 1),
            "unexpected_statuses": sorted(set(unexpected))}


def overload(api: Api, clients: int) -> dict:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        model_id = client.post("/v1/models", files={"file": ("m.onnx", _model_bytes())}).json()["id"]
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    counts = {"ok": 0, "503": 0, "503_with_retry_after": 0, "other": 0, "timeouts_or_errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one_client() -> None:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            barrier.wait()
            for _ in range(5):
                start = time.perf_counter()
                try:
                    response = client.get(f"/v1/jobs/{job_id}")
                except httpx.HTTPError:
                    with lock:
                        counts["timeouts_or_errors"] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if response.status_code == 200:
                        counts["ok"] += 1
                    elif response.status_code == 503:
                        counts["503"] += 1
                        counts["503_with_retry_after"] += "retry-after" in response.headers
                    else:
                        counts["other"] += 1

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"clients": clients, "max_inflight": 4, **counts,
            "latency_ms": {"p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99)}}


def upload_memory(api: Api, megabytes: int) -> dict:
    before = api.peak_rss_mb()
    chunk = os.urandom(1024 * 1024)
    boundary = "benchboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        for _ in range(megabytes):
            yield chunk
        yield tail

    started = time.perf_counter()
    response = httpx.post(f"{api.url}/v1/models", content=body(), timeout=600,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return {"streamed_mb": megabytes, "status": response.status_code, "seconds": round(time.perf_counter() - started, 1),
            "api_peak_rss_mb_before": round(before, 1), "api_peak_rss_mb_after": round(api.peak_rss_mb(), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--stream-mb", type=int, default=512)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        api = Api(Path(tmp) / "load", {"FEATHERWEIGHT_MAX_UPLOAD_BYTES": str((args.stream_mb + 16) * 1024**2)})
        try:
            results["load"] = load(api, args.clients, args.jobs, args.polls)
            if args.stream_mb:
                results["upload_memory"] = upload_memory(api, args.stream_mb)
        finally:
            api.stop()
        api = Api(Path(tmp) / "overload", {"FEATHERWEIGHT_API_MAX_INFLIGHT": "4"})
        try:
            results["overload"] = overload(api, 4 * args.clients)
        finally:
            api.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
