"""Queries on the ``datasets`` table."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.models import Dataset
from core.models.base import utcnow
from core.repos.paging import Page, paginate


class DatasetRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, **fields: Any) -> Dataset:
        dataset = Dataset(**fields)
        self.session.add(dataset)
        self.session.flush()
        return dataset

    def find(self, dataset_id: str, tenant_id: str | None = None) -> Dataset | None:
        """The dataset, or None when missing, deleted, or (with ``tenant_id``) another tenant's."""
        dataset = self.session.get(Dataset, dataset_id)
        if dataset is None or dataset.deleted_at is not None or (tenant_id is not None and dataset.tenant_id != tenant_id):
            return None
        return dataset

    def get(self, dataset_id: str, tenant_id: str | None = None) -> Dataset:
        dataset = self.find(dataset_id, tenant_id)
        if dataset is None:
            raise NotFound(f"data set {dataset_id!r} not found")
        return dataset

    def list(self, tenant_id: str, limit: int, cursor: str | None) -> Page[Dataset]:
        query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None))
        return paginate(self.session, query, Dataset, limit, cursor)

    def mark_deleted(self, dataset_id: str) -> bool:
        result = self.session.execute(
            update(Dataset).where(Dataset.id == dataset_id, Dataset.deleted_at.is_(None)).values(deleted_at=utcnow())
            .execution_options(synchronize_session=False))
        return result.rowcount == 1
