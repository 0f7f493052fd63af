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

    def find(self, model_id: str) -> Model | None:
        model = self.session.get(Model, model_id)
        return model if model is not None and model.deleted_at is None else None

    def get(self, model_id: str) -> Model:
        model = self.find(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} not found", [{"loc": ["model_id"], "msg": "no such model"}])
        return model

    def list(self, limit: int, cursor: str | None) -> Page[Model]:
        return paginate(self.session, select(Model).where(Model.deleted_at.is_(None)), Model, limit, cursor)

    def mark_deleted(self, model_id: str) -> bool:
        """Hide the model; its row stays for the jobs that used it."""
        result = self.session.execute(
            update(Model).where(Model.id == model_id, Model.deleted_at.is_(None)).values(deleted_at=utcnow())
            .execution_options(synchronize_session=False))
        return result.rowcount == 1
