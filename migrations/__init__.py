"""Alembic migrations for the Featherweight database, runnable without an alembic.ini.

``upgrade()`` / ``downgrade()`` build an Alembic ``Config`` pointing at this package; the database
URL comes from ``core.settings`` (or the ``url`` argument). ``featherweight migrate`` and
``featherweight serve`` call ``upgrade()``.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(revision: str = "head", url: str | None = None) -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str = "base", url: str | None = None) -> None:
    command.downgrade(alembic_config(url), revision)
