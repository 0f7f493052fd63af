"""Queries on the ``artifacts`` table."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.models import Artifact, Job


class ArtifactRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, job_id: str, name: str, storage_key: str, size: int, sha256: str, content_type: str,
            tenant_id: str | None = None) -> Artifact:
        """Record an artifact; it belongs to its job's tenant."""
        if tenant_id is None:
            tenant_id = self.session.scalar(select(Job.tenant_id).where(Job.id == job_id))
        artifact = Artifact(
            tenant_id=tenant_id, job_id=job_id, name=name, storage_key=storage_key, bytes=size, sha256=sha256,
            content_type=content_type,
        )
        self.session.add(artifact)
        self.session.flush()
        return artifact

    def list_for_job(self, job_id: str) -> list[Artifact]:
        return list(self.session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))

    def get(self, job_id: str, name: str) -> Artifact:
        artifact = self.session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
        if artifact is None:
            raise NotFound(f"job {job_id!r} has no artifact {name!r}")
        return artifact
