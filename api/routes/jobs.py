"""POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/artifacts/{name}."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SettingsDep, StoreDep
from api.problems import PROBLEM_JSON
from api.schemas.jobs import JobCreate, JobPublic
from api.services import jobs as service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}}


@router.post("", status_code=202, response_model=JobPublic, summary="Submit a compression job",
             responses={422: _PROBLEM, 503: _PROBLEM})
def submit_job(body: JobCreate, response: Response, session: SessionDep, settings: SettingsDep) -> JobPublic:
    job = service.submit_job(session, body, settings)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Retry-After"] = "1"
    return job


@router.get("/{job_id}", response_model=JobPublic, summary="A job's state, progress, report and artifacts",
            responses={404: _PROBLEM})
def get_job(job_id: str, session: SessionDep, settings: SettingsDep) -> JobPublic:
    return service.get_job(session, job_id, settings)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact: model (model.onnx), report.json, report.html",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: _PROBLEM},
)
def get_artifact(job_id: str, name: str, session: SessionDep, store: StoreDep) -> StreamingResponse:
    stream = service.open_artifact(session, store, job_id, name)
    headers = {
        "Content-Disposition": f'attachment; filename="{stream.filename}"',
        "Content-Length": str(stream.size),
        "ETag": f'"{stream.sha256}"',
        "X-Checksum-SHA256": stream.sha256,
    }
    return StreamingResponse(stream.chunks, media_type=stream.content_type, headers=headers)
