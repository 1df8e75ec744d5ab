"""The schema of the release before migrations: tasks and events, runs, run jobs, checkpoints, OpenAI files.

That release created tables as the processes that opened the store knew them, so a store it made may lack some:
this revision creates each table only where it is missing, and so both starts a new store and completes an old one.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the tables (those missing) as the release without migrations made them."""
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    def create_table(name: str, *columns: sa.Column) -> bool:
        if name in existing:
            return False
        op.create_table(name, *columns)
        return True

    create_table(
        "tasks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer()),
        sa.Column("epoch", sa.Float()),
        sa.Column("loss", sa.Float()),
        sa.Column("learning_rate", sa.Float()),
        sa.Column("tokens_per_second", sa.Float()),
        sa.Column("eta_seconds", sa.Float()),
        sa.Column("metrics", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("output_dir", sa.Text()),
        sa.Column("pid", sa.Integer()),
        sa.Column("created_at", TZ, nullable=False, index=True),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
    )
    create_table(
        "task_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text()),
        sa.Column("data", sa.JSON()),
    )
    create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("base_path", sa.Text(), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("resume_from", sa.Text()),
        sa.Column("resume_optimizer", sa.Integer(), nullable=False),
        sa.Column("pending_grads", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(64)),
        sa.Column("pid", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_used_at", TZ, nullable=False),
    )
    made_jobs = create_table(
        "run_jobs",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False, unique=False),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
    )
    if made_jobs:
        op.create_index("ix_run_jobs_id", "run_jobs", ["id"], unique=True)
    create_table(
        "run_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    create_table(
        "openai_files",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False, index=True),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False, index=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16)),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(32), index=True),
    )


def downgrade() -> None:
    """Drop every table."""
    for table in ("openai_files", "run_checkpoints", "run_jobs", "runs", "task_events", "tasks"):
        op.drop_table(table)
