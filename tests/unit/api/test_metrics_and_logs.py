"""GET /metrics (jobs by state, queue depth, job duration, bytes uploaded) and JSON logs with job_id."""
from __future__ import annotations

import datetime as dt
import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from core.db import session_scope
from core.logs import JsonFormatter, job_context
from core.models import Job, JobState
from core.repos import JobRepo

RECIPE = {"steps": [{"op": "fp16"}]}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_report_jobs_queues_durations_and_upload_bytes(api_client, onnx_models):
    data = onnx_models.mlp().SerializeToString()
    before = _samples(api_client.get("/metrics").text).get(("featherweight_uploaded_bytes_total", (("kind", "model"),)), 0)
    model_id = api_client.post("/v1/models", files={"file": ("m.onnx", data)}).json()["id"]
    ids = [api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": t}).json()["id"]
           for t in ("cpu-x86", "cpu-x86", "gpu")]
    with session_scope() as session:
        jobs = JobRepo(session)
        jobs.claim(ids[0], "w")
        jobs.transition(ids[0], JobState.SUCCEEDED, expected_attempt=1)
    with session_scope() as session:
        finished = JobRepo(session).get(ids[0]).finished_at
        session.query(Job).filter(Job.id == ids[0]).update({Job.started_at: finished - dt.timedelta(seconds=42)})
    response = api_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("featherweight_jobs", (("state", "queued"),))] == 2
    assert samples[("featherweight_jobs", (("state", "succeeded"),))] == 1
    assert samples[("featherweight_queue_depth", (("queue", "cpu-x86"),))] == 1
    assert samples[("featherweight_queue_depth", (("queue", "gpu"),))] == 1
    assert samples[("featherweight_job_duration_seconds_count", (("state", "succeeded"),))] == 1
    assert abs(samples[("featherweight_job_duration_seconds_sum", (("state", "succeeded"),))] - 42) < 1
    assert samples[("featherweight_job_duration_seconds_bucket", (("le", "30.0"), ("state", "succeeded")))] == 0
    assert samples[("featherweight_job_duration_seconds_bucket", (("le", "60.0"), ("state", "succeeded")))] == 1
    assert samples[("featherweight_uploaded_bytes_total", (("kind", "model"),))] - before == len(data)


def test_json_log_lines_carry_the_job_id():
    formatter = JsonFormatter()
    record = logging.LogRecord("featherweight.worker", logging.INFO, __file__, 1, "job %s started", ("j1",), None)
    with job_context("j1"):
        line = json.loads(formatter.format(record))
    assert line["msg"] == "job j1 started" and line["job_id"] == "j1" and line["level"] == "INFO"
    assert "job_id" not in json.loads(formatter.format(record))
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exc"]


def test_past_the_in_flight_limit_requests_are_503_at_once():
    import asyncio

    from api.overload import LoadShedder

    release = asyncio.Event()
    sent: list[dict] = []

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def collect(message):
        sent.append(message)

    async def scenario():
        shedder = LoadShedder(slow_app, max_inflight=2)
        scope = {"type": "http", "path": "/v1/jobs"}
        busy = [asyncio.create_task(shedder(scope, None, collect)) for _ in range(2)]
        await asyncio.sleep(0)
        await shedder(scope, None, collect)  # the third: shed without waiting
        shed = [m for m in sent if m["type"] == "http.response.start"]
        assert [m["status"] for m in shed] == [503]
        assert (b"retry-after", b"1") in shed[0]["headers"]
        release.set()
        await asyncio.gather(*busy)
        assert shedder.inflight == 0

    asyncio.run(scenario())


def test_a_full_queue_answers_503_with_retry_after(api_client, onnx_models, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_MAX_QUEUED_JOBS", "1")
    from core.settings import get_settings

    get_settings.cache_clear()
    model_id = api_client.post("/v1/models", files={"file": ("m.onnx", onnx_models.mlp().SerializeToString())}).json()["id"]
    assert api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).status_code == 202
    response = api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert api_client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE, "target": "gpu"}).status_code == 202
