"""Repositories: the only code that issues queries (routes stay thin). Each takes a Session."""
from core.repos.artifacts import ArtifactRepo
from core.repos.datasets import DatasetRepo
from core.repos.jobs import JobRepo
from core.repos.models import ModelRepo
from core.repos.tenants import TenantRepo
from core.repos.workers import WorkerRepo

__all__ = ["ArtifactRepo", "DatasetRepo", "JobRepo", "ModelRepo", "TenantRepo", "WorkerRepo"]
