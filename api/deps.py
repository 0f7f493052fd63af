"""FastAPI dependencies: the settings, a database session, the object store, the caller's tenant.

Each is an ``Annotated`` alias so routes read ``session: SessionDep``. The session is closed after the
request; services commit explicitly, so nothing is committed by accident.

``TenantDep`` reads the API key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (both
declared as OpenAPI security schemes, so Swagger UI's Authorize button sets them). With
FEATHERWEIGHT_AUTH=required a missing, unknown or revoked key is 401; with auth disabled a request
without a key acts as the default tenant (a key, when sent, must still be valid).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.db import get_sessionmaker
from core.errors import Unauthorized
from core.models import DEFAULT_TENANT
from core.repos import TenantRepo
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store

bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <API key>`")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="`X-API-Key: <API key>`")


def _session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]


def _tenant(
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> str:
    key = bearer.credentials if bearer is not None else api_key
    if not key:
        if settings.auth_required:
            raise Unauthorized("an API key is required: Authorization: Bearer <key> or X-API-Key: <key>")
        return DEFAULT_TENANT
    tenant_id = TenantRepo(session).resolve(key.strip())
    if tenant_id is None:
        raise Unauthorized("the API key is unknown or revoked")
    return tenant_id


TenantDep = Annotated[str, Depends(_tenant)]
