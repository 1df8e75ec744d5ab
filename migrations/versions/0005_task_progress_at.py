"""When a running task last reported progress (a progress write or an event): a worker silent too long is stalled.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add tasks.progress_at (existing rows: none; a running task then counts from its start)."""
    op.add_column("tasks", sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop tasks.progress_at."""
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("progress_at")
