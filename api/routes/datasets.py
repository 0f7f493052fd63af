"""POST /v1/datasets (streamed .npz upload), GET /v1/datasets (paged), GET and DELETE /v1/datasets/{id}."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.problems import PROBLEM_JSON
from api.schemas.datasets import DatasetPage, DatasetPublic
from api.services import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

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
                                            "description": "an .npz (numpy.savez): one array per model input"}},
                }
            }
        },
    }
}


@router.post(
    "", status_code=201, response_model=DatasetPublic, summary="Upload a calibration / evaluation data set (.npz)",
    description="One array per model input, keyed by the input's name (docs/datasets.md); optional `_labels`. "
    "Loaded with allow_pickle=False: object arrays, non-numeric dtypes, NaN/Inf and zip bombs are refused (422).",
    openapi_extra=UPLOAD_BODY, responses={400: _PROBLEM, 413: _PROBLEM, 422: _PROBLEM},
)
async def upload_dataset(request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep,
                   tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.model_validate(await service.upload_dataset(request, session, store, settings, tenant))


@router.get("", response_model=DatasetPage, summary="Data sets, newest first", responses={422: _PROBLEM})
def list_datasets(session: SessionDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=200), cursor: str | None = Query(None, max_length=512)) -> DatasetPage:
    page = service.list_datasets(session, tenant, limit, cursor)
    return DatasetPage(items=[DatasetPublic.model_validate(d) for d in page.items], next_cursor=page.next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses={404: _PROBLEM})
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.model_validate(service.get_dataset(session, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=204, response_class=Response, summary="Delete a data set",
               responses={404: _PROBLEM, 409: _PROBLEM})
def delete_dataset(dataset_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    service.delete_dataset(session, store, dataset_id, tenant)
    return Response(status_code=204)
