"""Several servers on one store: which server owns a running task (or run), and a cancel it must carry out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add tasks.owner, tasks.cancel_requested and runs.owner (existing rows: no owner, no cancel pending)."""
    op.add_column("tasks", sa.Column("owner", sa.String(128), nullable=True))
    op.add_column("tasks", sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_tasks_owner", "tasks", ["owner"])
    op.add_column("runs", sa.Column("owner", sa.String(128), nullable=True))


def downgrade() -> None:
    """Drop the three columns."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("owner")
    op.drop_index("ix_tasks_owner", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("owner")
