"""Alembic environment: migrations run on the connection that service.db passes in (never from alembic.ini)."""

from alembic import context

import entity.fine_tuning
import entity.runs  # noqa: F401  - registers the run tables
from entity.task import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    """Run the pending migrations on the given connection (online mode only)."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("Run migrations through service.db.upgrade(engine), which passes a connection.")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
