"""End to end over real HTTP on Postgres + Redis + the S3 server: uvicorn and a Celery worker as subprocesses."""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.e2e.flow import run_three_models

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def _heartbeat_queues(url: str, deadline_s: float = 90.0) -> list[str]:
    engine = sa.create_engine(url)
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                queues = [row[0] for row in connection.execute(sa.text("SELECT queue FROM workers"))]
            if queues:
                return queues
            time.sleep(0.3)
        return []
    finally:
        engine.dispose()


def test_upload_compress_download_on_full_stack(full_stack_service, full_stack, onnx_models):
    from core.storage import get_store

    assert _heartbeat_queues(full_stack["FEATHERWEIGHT_DATABASE_URL"]) == ["cpu-x86"]
    jobs = run_three_models(full_stack_service.url, onnx_models, full_stack_service.logs)
    store = get_store()
    keys = {item["Key"] for item in store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])}
    for job in jobs.values():
        assert f"jobs/{job['id']}/1/model.onnx" in keys and f"jobs/{job['id']}/1/report.json" in keys
        assert job["attempts"] == 1
