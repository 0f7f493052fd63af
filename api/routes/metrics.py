"""GET /metrics: Prometheus text exposition (api.services.metrics)."""
from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api.services import metrics

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics: jobs by state, queue depth, job duration, bytes uploaded",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def get_metrics() -> Response:
    return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE_LATEST)
