"""Alembic: upgrade head -> downgrade base -> upgrade head, on SQLite and on Postgres; the schema
after upgrade matches the SQLAlchemy models exactly."""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import core.models
import migrations

TABLES = {"alembic_version", "api_keys", "artifacts", "datasets", "job_events", "jobs", "models", "tenants", "workers"}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _drift(url: str) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), core.models.Base.metadata)
    finally:
        engine.dispose()


def _up_down_up(url: str) -> None:
    migrations.upgrade(url=url)
    assert _tables(url) == TABLES
    assert _drift(url) == []
    migrations.downgrade(url=url)
    assert _tables(url) <= {"alembic_version"}
    migrations.upgrade(url=url)
    assert _tables(url) == TABLES
    assert _drift(url) == []


def test_up_down_up_on_sqlite(tmp_path):
    _up_down_up(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.integration
def test_up_down_up_on_postgres(postgres_url):
    _up_down_up(postgres_url)


def test_upgrade_reads_the_url_from_settings(fw_home):
    migrations.upgrade()
    assert _tables(f"sqlite:///{fw_home / 'featherweight.db'}") == TABLES
