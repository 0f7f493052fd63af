"""Queries on ``tenants`` and ``api_keys``: create a key (shown once), resolve a presented key, revoke."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import InvalidInput, NotFound
from core.models import ApiKey, Tenant
from core.models.base import utcnow

_KEY_RE = re.compile(r"^fw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant: str
    key: str  # the only time the full key exists outside the client


class TenantRepo:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_or_create(self, name: str) -> Tenant:
        if not _NAME_RE.match(name):
            raise InvalidInput(f"invalid tenant name {name!r}", [{"loc": ["tenant"], "msg": "letters, digits, . _ -"}])
        tenant = self.session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            tenant = Tenant(name=name, webhook_secret=secrets.token_hex(32), created_at=utcnow())
            self.session.add(tenant)
            self.session.flush()
        return tenant

    def by_name(self, name: str) -> Tenant:
        tenant = self.session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise NotFound(f"no tenant {name!r}")
        return tenant

    def find(self, tenant_id: str) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def create_key(self, tenant_name: str) -> NewKey:
        tenant = self.get_or_create(tenant_name)
        key_id = secrets.token_hex(8)
        key = f"fw_{key_id}_{secrets.token_urlsafe(32)}"
        self.session.add(ApiKey(id=key_id, tenant_id=tenant.id, key_sha256=hash_key(key), created_at=utcnow()))
        self.session.flush()
        return NewKey(key_id, tenant.name, key)

    def resolve(self, key: str) -> str | None:
        """The tenant id of a valid, unrevoked key; None otherwise (same cost either way)."""
        match = _KEY_RE.match(key)
        row = self.session.get(ApiKey, match.group(1)) if match else None
        expected = row.key_sha256 if row is not None else "0" * 64
        if not hmac.compare_digest(expected, hash_key(key)) or row is None or row.revoked_at is not None:
            return None
        return row.tenant_id

    def revoke(self, key_id: str) -> bool:
        result = self.session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
            .execution_options(synchronize_session=False))
        if result.rowcount != 1 and self.session.get(ApiKey, key_id) is None:
            raise NotFound(f"no API key {key_id!r}")
        return result.rowcount == 1

    def keys(self) -> list[tuple[ApiKey, str]]:
        rows = self.session.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                                    .order_by(Tenant.name, ApiKey.created_at))
        return [(key, name) for key, name in rows]
