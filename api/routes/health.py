"""Liveness (/health: the process answers) and readiness (/ready: database, broker, storage reachable)."""
from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.services.health import readiness

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process is up")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Database, broker and storage are reachable (503 problem otherwise)")
async def ready() -> dict[str, object]:
    return await run_in_threadpool(readiness)
