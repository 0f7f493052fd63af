"""POST /v1/models (streamed multipart upload), GET /v1/models (paged), GET and DELETE /v1/models/{id}."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.problems import PROBLEM_JSON
from api.schemas.models import ModelPage, ModelPublic
from api.services import models as service

router = APIRouter(prefix="/v1/models", tags=["models"])

_PROBLEM = {"content": {PROBLEM_JSON: {}}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary",
                                            "description": "an .onnx file, or a .zip of one .onnx and its external-data files"}},
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    summary="Upload an ONNX model",
    description="Streamed to disk with a byte cap and sha256, then validated without loading external data "
    "or running it. 413 past the upload limit, 422 when the file is not a valid ONNX model.",
    openapi_extra=UPLOAD_BODY,
    responses={400: _PROBLEM, 413: _PROBLEM, 422: _PROBLEM},
)
async def upload_model(request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep,
                   tenant: TenantDep) -> ModelPublic:
    model = await service.upload_model(request, session, store, settings, tenant)
    return ModelPublic.model_validate(model)


@router.get("", response_model=ModelPage, summary="Models, newest first", responses={422: _PROBLEM})
def list_models(session: SessionDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=200), cursor: str | None = Query(None, max_length=512)) -> ModelPage:
    page = service.list_models(session, tenant, limit, cursor)
    return ModelPage(items=[ModelPublic.model_validate(m) for m in page.items], next_cursor=page.next_cursor)


@router.delete("/{model_id}", status_code=204, response_class=Response, summary="Delete a model",
               description="Its bytes are deleted; finished jobs keep their results. 409 while a queued or "
               "running job uses it.", responses={404: _PROBLEM, 409: _PROBLEM})
def delete_model(model_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    service.delete_model(session, store, model_id, tenant)
    return Response(status_code=204)


@router.get("/{model_id}", response_model=ModelPublic, responses={404: _PROBLEM})
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    return ModelPublic.model_validate(service.get_model(session, model_id, tenant))
