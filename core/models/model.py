"""The ``models`` table: one uploaded, validated ONNX model and where its bytes are stored."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, UTCDateTime, new_id, utcnow


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True,
                                           default="default", server_default="default")
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[int] = mapped_column(BigInteger)
    opset: Mapped[int] = mapped_column(Integer)
    ir_version: Mapped[int] = mapped_column(Integer)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
