"""Tenants and API keys; every model, data set, job and artifact belongs to a tenant (existing rows
to the ``default`` tenant); Idempotency-Key per tenant; the webhook outbox columns of a job.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""
from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
OWNED = ("models", "datasets", "jobs", "artifacts")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("webhook_secret", sa.String(128), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.execute(sa.text("INSERT INTO tenants (id, name, webhook_secret, created_at) "
                       "VALUES ('default', 'default', :secret, CURRENT_TIMESTAMP)").bindparams(secret=secrets.token_hex(32)))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_api_keys_tenant_id_tenants", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(36), nullable=False, server_default="default"))
            batch.create_foreign_key(f"fk_{table}_tenant_id_tenants", "tenants", ["tenant_id"], ["id"], ondelete="RESTRICT")
            batch.create_index(f"ix_{table}_tenant_id", ["tenant_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("webhook_url", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("webhook_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_next_at", TS, nullable=True))
        batch.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))
        batch.create_unique_constraint("uq_jobs_tenant_id_idempotency_key", ["tenant_id", "idempotency_key"])
        batch.create_index("ix_jobs_webhook_state", ["webhook_state"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_webhook_state")
        batch.drop_constraint("uq_jobs_tenant_id_idempotency_key", type_="unique")
        for column in ("webhook_error", "webhook_next_at", "webhook_attempts", "webhook_state", "webhook_url",
                       "request_sha256", "idempotency_key"):
            batch.drop_column(column)
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant_id")
            batch.drop_constraint(f"fk_{table}_tenant_id_tenants", type_="foreignkey")
            batch.drop_column("tenant_id")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
