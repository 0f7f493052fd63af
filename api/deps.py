"""FastAPI dependencies: the settings, a database session, the object store.

Each is an ``Annotated`` alias so routes read ``session: SessionDep``. The session is closed after the
request; services commit explicitly, so nothing is committed by accident.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from core.db import get_sessionmaker
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store


def _session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
