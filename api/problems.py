"""Renders every error as RFC 9457 ``application/problem+json`` (docs/rest.md, "Errors").

``FeatherweightError`` carries its own status and type; FastAPI's request validation errors become a
422 ``invalid-input`` problem with each field's path; Starlette's HTTP errors (404 for an unknown
route, 405) keep their status; a database that cannot be reached (``OperationalError``) is a 503 with
Retry-After; anything else is logged and answered as a 500 problem that reveals
nothing about the internals.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import PROBLEM_BASE, FeatherweightError, InvalidInput, Unavailable

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("featherweight.api")


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(problem, status_code=problem["status"], media_type=PROBLEM_JSON, headers=headers)


async def _featherweight_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FeatherweightError)
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="featherweight"'}
    return problem_response(exc.to_problem(), headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    problem = InvalidInput(f"invalid request: {where}: {first['msg']}", errors).to_problem()
    return problem_response(problem)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    problem = {
        "type": PROBLEM_BASE + slug,
        "title": str(exc.detail) if exc.status_code != 404 else "Not found",
        "status": exc.status_code,
        "detail": str(exc.detail),
        "errors": [],
    }
    return problem_response(problem, dict(exc.headers) if exc.headers else None)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    problem = Unavailable("the database is unreachable; try again shortly").to_problem()
    return problem_response(problem, {"Retry-After": "5"})


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    problem = {
        "type": PROBLEM_BASE + "internal-error",
        "title": "Internal error",
        "status": 500,
        "detail": "the server failed to handle this request",
        "errors": [],
    }
    return problem_response(problem)


def install(app: FastAPI) -> None:
    app.add_exception_handler(FeatherweightError, _featherweight_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
