"""Response models of uploaded data sets."""
from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict


class ArrayInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    sha256: str
    bytes: int
    arrays: list[ArrayInfo]
    created_at: dt.datetime


class DatasetPage(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None
