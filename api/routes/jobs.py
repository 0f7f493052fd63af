"""POST /v1/jobs, GET /v1/jobs (paged, by state), GET / DELETE /v1/jobs/{id}, POST /v1/jobs/{id}:cancel,
GET /v1/jobs/{id}/events, GET /v1/jobs/{id}/artifacts/{name}."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Response
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.examples import JOB_EXAMPLES
from api.problems import PROBLEM_JSON
from api.schemas.jobs import JobCreate, JobEventPublic, JobPage, JobPublic
from api.services import jobs as service
from core.models import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}}


@router.post("", status_code=202, response_model=JobPublic, summary="Submit a compression job",
             description="Checked before it is queued (recipe, data sets against the model's inputs, calibration "
             "where the recipe needs it): a job that cannot succeed is refused with 422. 202 with Location and "
             "Retry-After; poll the Location. With an Idempotency-Key header, a retry with the same key and body "
             "returns the same job; the key with another body is 422; while the first request is still being "
             "processed, 409.", responses={409: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM})
def submit_job(body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)], response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
               idempotency_key: str | None = Header(None, min_length=1, max_length=255,
                                                    description="retry-safe submit: same key and body, same job")) -> JobPublic:
    job = service.submit_job(session, body, settings, tenant, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Retry-After"] = "1"
    return job


@router.get("", response_model=JobPage, summary="Jobs, newest first, optionally in one state",
            responses={422: _PROBLEM})
def list_jobs(session: SessionDep, settings: SettingsDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=200),
              cursor: str | None = Query(None, max_length=512), state: JobState | None = None) -> JobPage:
    items, next_cursor = service.list_jobs(session, settings, tenant, limit, cursor, state.value if state else None)
    return JobPage(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="A job's state, progress, report and artifacts",
            description="Carries an ETag; send it back in If-None-Match to get 304 while nothing changed. "
            "Retry-After suggests when to poll again while the job is not finished.",
            responses={304: {"description": "not modified"}, 404: _PROBLEM})
def get_job(job_id: str, response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
            if_none_match: str | None = Header(None, max_length=1024)) -> JobPublic | Response:
    job = service.get_job(session, job_id, settings, tenant)
    headers = service.poll_headers(job)
    if if_none_match is not None and headers["ETag"] in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    response.headers.update(headers)
    return job


@router.post("/{job_id}:cancel", response_model=JobPublic, summary="Cancel a queued or running job",
             description="A queued job is cancelled at once; a running one stops within seconds and its partial "
             "results are deleted. 409 when the job already finished.", responses={404: _PROBLEM, 409: _PROBLEM})
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobPublic:
    return service.cancel_job(session, job_id, settings, tenant)


@router.delete("/{job_id}", status_code=204, response_class=Response, summary="Delete a finished job and its artifacts",
               responses={404: _PROBLEM, 409: _PROBLEM})
def delete_job(job_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    service.delete_job(session, store, job_id, tenant)
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=list[JobEventPublic],
            summary="The job's history: each state change and each new progress stage", responses={404: _PROBLEM})
def job_events(job_id: str, session: SessionDep, tenant: TenantDep) -> list[JobEventPublic]:
    return service.job_events(session, job_id, tenant)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact: model (model.onnx), report.json, report.html, sensitivity.json, "
            "candidate-1..3 (a goal's next best verified models), or an export format's file "
            "(model.ort, model.tflite, model.pt ...)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: _PROBLEM},
)
def get_artifact(job_id: str, name: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> StreamingResponse:
    stream = service.open_artifact(session, store, job_id, name, tenant)
    headers = {
        "Content-Disposition": f'attachment; filename="{stream.filename}"',
        "Content-Length": str(stream.size),
        "ETag": f'"{stream.sha256}"',
        "X-Checksum-SHA256": stream.sha256,
    }
    return StreamingResponse(stream.chunks, media_type=stream.content_type, headers=headers)
