"""The one exception tree of Featherweight (rendered as docs/rest.md describes under "Errors").

Every error a client can cause, or that the service reports, is a ``FeatherweightError``. Each class
carries the HTTP status and the RFC 9457 problem ``type`` URI that ``api.problems`` renders as
``application/problem+json``; the worker stores ``type`` and ``detail`` on a failed job. Field-level
faults go in ``errors`` as ``{"loc": [...path...], "msg": "..."}``.

``InvalidModel`` answers 422: the request itself is well formed (a multipart upload with a file), it
is the file's content that cannot be processed, which is what 422 means (RFC 9110 §15.5.21).
"""
from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://featherweight.dev/problems/"


class FeatherweightError(Exception):
    """Base of every error the service raises on purpose."""

    status: int = 500
    type: str = PROBLEM_BASE + "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str | None = None, errors: list[dict[str, Any]] | None = None) -> None:
        self.detail = detail or self.title
        self.errors: list[dict[str, Any]] = list(errors or [])
        super().__init__(self.detail)

    def __reduce__(self) -> tuple[Any, ...]:
        # keeps detail and errors across pickling (an error raised in a validation subprocess)
        return (self.__class__, (self.detail, self.errors))

    def to_problem(self) -> dict[str, Any]:
        """The RFC 9457 body for this error."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", ""))} for e in self.errors],
        }

    def __str__(self) -> str:
        return self.detail


class InvalidInput(FeatherweightError):
    status = 422
    type = PROBLEM_BASE + "invalid-input"
    title = "Invalid input"


class RecipeError(InvalidInput):
    type = PROBLEM_BASE + "invalid-recipe"
    title = "Invalid recipe"


class InvalidModel(InvalidInput):
    type = PROBLEM_BASE + "invalid-model"
    title = "Invalid model"


class TargetUnavailable(InvalidInput):
    """The job's target cannot run where the job runs (a ``gpu`` job on a host without working
    CUDA), and the request did not allow measuring on other hardware."""

    type = PROBLEM_BASE + "target-unavailable"
    title = "Target unavailable here"


class BadRequest(FeatherweightError):
    """The HTTP request itself is malformed (not multipart, no file part, too many parts)."""

    status = 400
    type = PROBLEM_BASE + "bad-request"
    title = "Bad request"


class Unauthorized(FeatherweightError):
    """No API key, or one that is unknown or revoked (the API adds WWW-Authenticate)."""

    status = 401
    type = PROBLEM_BASE + "unauthorized"
    title = "Unauthorized"


class NotFound(FeatherweightError):
    status = 404
    type = PROBLEM_BASE + "not-found"
    title = "Not found"


class Conflict(FeatherweightError):
    status = 409
    type = PROBLEM_BASE + "conflict"
    title = "Conflict"


class InvalidTransition(Conflict):
    """A guarded state transition found the row in a state it may not leave that way."""

    type = PROBLEM_BASE + "invalid-transition"
    title = "Invalid state transition"


class RequestTimeout(FeatherweightError):
    """The client stopped sending the request body (a stalled upload)."""

    status = 408
    type = PROBLEM_BASE + "request-timeout"
    title = "Request timeout"


class PayloadTooLarge(FeatherweightError):
    status = 413
    type = PROBLEM_BASE + "payload-too-large"
    title = "Payload too large"


class InsufficientStorage(FeatherweightError):
    """The server ran out of disk while receiving or storing (RFC 4918 §11.5)."""

    status = 507
    type = PROBLEM_BASE + "insufficient-storage"
    title = "Insufficient storage"


class Unavailable(FeatherweightError):
    status = 503
    type = PROBLEM_BASE + "unavailable"
    title = "Service unavailable"


class PipelineError(FeatherweightError):
    """A compression run failed for a reason that is not the client's input (reported on the job)."""

    status = 500
    type = PROBLEM_BASE + "pipeline-failed"
    title = "Compression failed"
