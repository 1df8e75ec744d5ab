"""Several schedulers on one store: which scheduler owns a running task, and a cancel it must carry out.

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
    """Add tasks.owner and tasks.cancel_requested (existing rows: no owner, no cancel pending)."""
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_index("ix_tasks_owner", ["owner"])


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_owner")
        batch.drop_column("cancel_requested")
        batch.drop_column("owner")
