"""The FastAPI application factory: routers, problem+json handlers, OpenAPI metadata.

``create_app()`` builds a fresh app (tests make one per settings); ``app`` is the module-level
instance uvicorn serves (``uvicorn api.main:app``). Nothing here touches the database at import.
"""
from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.routes import datasets, health, jobs, models


def create_app() -> FastAPI:
    app = FastAPI(
        title="Featherweight",
        version="0.1.0",
        summary="Compression as a service for ONNX models",
        description="Upload an ONNX model, submit a recipe (CONTRACT.md §1), poll the job, download the result. "
        "Errors are application/problem+json (RFC 9457).",
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    return app


app = create_app()
