"""Data sets: the ``datasets`` table, the calibration / evaluation data set of a job, and
``deleted_at`` on models and data sets (a deleted one keeps its row for the jobs that used it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("arrays", sa.JSON(), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
    )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_models_created_at", ["created_at"])
    op.create_index("ix_datasets_created_at", "datasets", ["created_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("calibration_dataset_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("eval_dataset_id", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_jobs_calibration_dataset_id_datasets", "datasets",
                                 ["calibration_dataset_id"], ["id"], ondelete="RESTRICT")
        batch.create_foreign_key("fk_jobs_eval_dataset_id_datasets", "datasets",
                                 ["eval_dataset_id"], ["id"], ondelete="RESTRICT")
        batch.create_index("ix_jobs_calibration_dataset_id", ["calibration_dataset_id"])
        batch.create_index("ix_jobs_eval_dataset_id", ["eval_dataset_id"])
        batch.create_index("ix_jobs_created_at", ["created_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_created_at")
        batch.drop_index("ix_jobs_eval_dataset_id")
        batch.drop_index("ix_jobs_calibration_dataset_id")
        batch.drop_constraint("fk_jobs_eval_dataset_id_datasets", type_="foreignkey")
        batch.drop_constraint("fk_jobs_calibration_dataset_id_datasets", type_="foreignkey")
        batch.drop_column("eval_dataset_id")
        batch.drop_column("calibration_dataset_id")
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_created_at")
        batch.drop_column("deleted_at")
    op.drop_index("ix_datasets_created_at", table_name="datasets")
    op.drop_table("datasets")
