"""Queries on the ``models`` table."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.errors import NotFound
from core.models import Model


class ModelRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, **fields: Any) -> Model:
        model = Model(**fields)
        self.session.add(model)
        self.session.flush()
        return model

    def find(self, model_id: str) -> Model | None:
        return self.session.get(Model, model_id)

    def get(self, model_id: str) -> Model:
        model = self.find(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} not found", [{"loc": ["model_id"], "msg": "no such model"}])
        return model
