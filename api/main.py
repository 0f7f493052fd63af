"""The FastAPI application factory: routers, problem+json handlers, OpenAPI metadata.

``create_app()`` builds a fresh app (tests make one per settings); ``app`` is the module-level
instance uvicorn serves (``uvicorn api.main:app``). Nothing here touches the database at import.
Swagger UI (``/docs``) and ReDoc (``/redoc``) are served with their assets from this service (the
``fastapi-offline`` package ships them), so they work without internet access.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import problems
from api.overload import LoadShedder
from core.settings import get_settings
from api.routes import datasets, health, jobs, metrics, models


log = logging.getLogger("featherweight.api")
STATIC_DOCS_URL = "/static/docs"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if get_settings().auth_required:
        log.info("API keys required (FEATHERWEIGHT_AUTH=required)")
    else:
        log.warning("authentication is DISABLED: requests without an API key act as the single default tenant "
                    "(set FEATHERWEIGHT_AUTH=required to require keys)")
    yield
    from core import isolation

    isolation.shutdown()


def create_app() -> FastAPI:
    # FastAPIOffline is FastAPI whose /docs (Swagger UI) and /redoc pages load their scripts, styles
    # and favicon from this service (STATIC_DOCS_URL), not from a CDN: a service in a closed network
    # still shows them.
    app = FastAPIOffline(
        static_url=STATIC_DOCS_URL,
        lifespan=_lifespan,
        title="Featherweight",
        version="0.1.0",
        summary="Compression as a service for ONNX models",
        description="Upload an ONNX model, submit a recipe (docs/recipes.md), poll the job, download the result. "
        "Errors are application/problem+json (RFC 9457).",
    )
    problems.install(app)
    app.add_middleware(LoadShedder)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    return app


app = create_app()
