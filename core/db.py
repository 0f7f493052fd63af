"""The SQLAlchemy 2 engine and session factory, built once per process from the settings.

SQLite (the embedded default) is opened in WAL mode with a busy timeout and foreign keys on, so the
API and the worker can share one file. ``reset_engine()`` drops the cached engine: a forked Celery
child calls it so it never reuses its parent's connections, and tests call it after changing settings.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API object
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # a server that does not answer (not even with a refusal) fails a connect in 5 s, so a request
    # meets the outage as a prompt 503 (api.problems), never a hang
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args)


@functools.lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@functools.lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def reset_engine(close: bool = True) -> None:
    """Forget the cached engine; ``close=False`` in a forked child leaves the parent's sockets alone."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=close)
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


@contextlib.contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping() -> None:
    """SELECT 1 against the database; raises on failure."""
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))
