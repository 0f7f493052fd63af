"""Keyset paging shared by the list queries: newest first, ``limit`` rows, an opaque ``cursor``.

The cursor is the (created_at, id) of the last row returned, base64url-encoded JSON; the next page
holds the rows strictly after it in (created_at desc, id desc) order, so inserts while a client
pages never repeat or skip a row.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from core.errors import InvalidInput

T = TypeVar("T")
MAX_LIMIT = 200


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(created_at: dt.datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        created_at = dt.datetime.fromisoformat(stamp)
        if created_at.tzinfo is None or not isinstance(row_id, str):
            raise ValueError("bad cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("invalid cursor", [{"loc": ["query", "cursor"], "msg": "not a cursor this API returned"}]) from None
    return created_at, row_id


def paginate(session: Session, query: Select[Any], table: Any, limit: int, cursor: str | None) -> Page[Any]:
    limit = max(1, min(int(limit), MAX_LIMIT))
    if cursor:
        created_at, row_id = decode_cursor(cursor)
        query = query.where(or_(table.created_at < created_at,
                                and_(table.created_at == created_at, table.id < row_id)))
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)
