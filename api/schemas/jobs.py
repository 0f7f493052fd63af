"""Request and response models of compression jobs."""
from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.targets import Target

EXAMPLE_RECIPE = {"steps": [{"op": "quantize", "weights": {"bits": 8, "symmetric": True, "granularity": "channel"}}]}


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model_id": "<id from POST /v1/models>", "recipe": EXAMPLE_RECIPE,
                                         "target": "cpu-x86"}]},
    )

    model_id: str = Field(..., min_length=1, max_length=64)
    recipe: dict[str, Any] | str = Field(..., description="the recipe (docs/recipes.md) as an object, or JSON/YAML text")
    target: Target = Target.CPU_X86
    calibration_dataset_id: str | None = Field(None, min_length=1, max_length=64,
                                               description="a data set from POST /v1/datasets (docs/datasets.md)")
    eval_dataset_id: str | None = Field(None, min_length=1, max_length=64,
                                        description="data for the report's fidelity and accuracy")
    webhook_url: str | None = Field(None, min_length=8, max_length=2048,
                                    description="POSTed a signed event when the job finishes (http or https, public host)")
    allow_target_mismatch: bool = Field(
        False, description="run even where the target's hardware cannot (a gpu job on a worker without CUDA); "
                           "the report then says its latency was not measured on the target")


class ArtifactPublic(BaseModel):
    name: str
    bytes: int
    sha256: str
    content_type: str
    url: str


class JobPublic(BaseModel):
    id: str
    model_id: str
    state: str
    progress: float
    stage: str | None
    error: dict[str, Any] | None
    target: str
    allow_target_mismatch: bool = False
    recipe: dict[str, Any]
    report: dict[str, Any] | None
    artifacts: list[ArtifactPublic]
    calibration_dataset_id: str | None
    eval_dataset_id: str | None
    webhook_url: str | None = None
    webhook_state: str | None = Field(None, description="pending | delivered | failed, once the job finished")
    attempts: int
    max_attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: dt.datetime
    kind: str
    state: str
    stage: str | None
    progress: float
    message: str | None
