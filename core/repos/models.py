"""Queries on the ``models`` table."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.models import Model
from core.models.base import utcnow
from core.repos.paging import Page, paginate


class ModelRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, **fields: Any) -> Model:
        model = Model(**fields)
        self.session.add(model)
        self.session.flush()
        return model

    def find(self, model_id: str, tenant_id: str | None = None) -> Model | None:
        """The model, or None when missing, deleted, or (with ``tenant_id``) another tenant's."""
        model = self.session.get(Model, model_id)
        if model is None or model.deleted_at is not None or (tenant_id is not None and model.tenant_id != tenant_id):
            return None
        return model

    def get(self, model_id: str, tenant_id: str | None = None) -> Model:
        model = self.find(model_id, tenant_id)
        if model is None:
            raise NotFound(f"model {model_id!r} not found", [{"loc": ["model_id"], "msg": "no such model"}])
        return model

    def list(self, tenant_id: str, limit: int, cursor: str | None) -> Page[Model]:
        query = select(Model).where(Model.tenant_id == tenant_id, Model.deleted_at.is_(None))
        return paginate(self.session, query, Model, limit, cursor)

    def mark_deleted(self, model_id: str) -> bool:
        """Hide the model; its row stays for the jobs that used it."""
        result = self.session.execute(
            update(Model).where(Model.id == model_id, Model.deleted_at.is_(None)).values(deleted_at=utcnow())
            .execution_options(synchronize_session=False))
        return result.rowcount == 1
