"""The ``tenants`` and ``api_keys`` tables.

A key is shown once, at creation: ``fw_<key_id>_<secret>``. Only ``key_id`` and the sha256 of the
whole key are stored; the secret has 256 bits of entropy, so a plain hash is enough (no slow KDF is
needed for a random, non-memorable secret). ``DEFAULT_TENANT`` owns everything on a service that runs
without keys (FEATHERWEIGHT_AUTH=disabled).
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, UTCDateTime, new_id, utcnow

DEFAULT_TENANT = "default"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # signs this tenant's webhooks; created with the tenant, never shown by the API
    webhook_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
