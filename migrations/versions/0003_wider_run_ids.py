"""Run ids up to 128 characters: a Tinker model id (`<session>:train:<n>`) is longer than 32.

SQLite never enforced the old VARCHAR(32), PostgreSQL does. On SQLite the tables are rebuilt (batch mode, with
foreign keys off during migrations, so the runs' jobs stay).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (("runs", "id"), ("run_jobs", "run_id"), ("run_checkpoints", "run_id"))


def upgrade() -> None:
    """Widen runs.id and the columns that refer to it."""
    for table, column in COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(128), existing_type=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    """Back to 32 characters (fails on PostgreSQL while a longer id is stored)."""
    for table, column in reversed(COLUMNS):
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(32), existing_type=sa.String(128), existing_nullable=False)
