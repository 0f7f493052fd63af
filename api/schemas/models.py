"""Response model of an uploaded ONNX model."""
from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class TensorInfo(BaseModel):
    name: str
    dtype: str | None
    shape: list[int | str | None] | None


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    sha256: str
    bytes: int
    params: int = Field(description="elements of the model's weights: every initializer, and each Constant node "
                                    "a layer reads as its weight (converters such as paddle2onnx write weights so)")
    opset: int
    ir_version: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    created_at: dt.datetime


class ModelPage(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None
