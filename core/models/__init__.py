"""The SQLAlchemy tables: tenants, api_keys, models, datasets, jobs, job_events, artifacts, workers (heartbeats).

Importing this package registers every table on ``Base.metadata`` (Alembic's env.py relies on it).
"""
from core.models.base import Base
from core.models.dataset import Dataset
from core.models.job import Artifact, Job, JobEvent, JobState
from core.models.model import Model
from core.models.tenant import DEFAULT_TENANT, ApiKey, Tenant
from core.models.worker import WorkerHeartbeat

__all__ = ["DEFAULT_TENANT", "ApiKey", "Artifact", "Base", "Dataset", "Tenant", "Job", "JobEvent", "JobState", "Model", "WorkerHeartbeat"]
