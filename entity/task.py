"""ORM rows for durable tasks and their events, plus the task response schemas."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator
from sqlalchemy import JSON, Boolean, DateTime, Dialect, Float, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from entity.paths import ClientJson, ClientPath, root_role


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the store uses."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware (SQLite keeps no offset, so it is re-attached)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store UTC; a naive value is taken to be UTC already."""
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as an aware UTC datetime, so the API's timestamps carry their timezone."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class TaskStatus(StrEnum):
    """Lifecycle: queued -> running -> succeeded | failed | cancelled; a training task may pause and resume."""

    queued = "queued"
    running = "running"
    paused = "paused"  # a checkpoint saved and the process gone; resume queues it again
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATUSES = (TaskStatus.queued, TaskStatus.running)
TERMINAL_STATUSES = (TaskStatus.succeeded, TaskStatus.failed, TaskStatus.cancelled)


class TaskKind(StrEnum):
    """What a task does; each kind has a handler in the worker."""

    train = "train"
    eval = "eval"
    export = "export"


class Base(DeclarativeBase):
    """Declarative base of the task store."""


class TaskRow(Base):
    """One background task and its latest progress."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=TaskStatus.queued)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epoch: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)  # the claiming scheduler
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # When the task last reported progress (a progress write or an event); a running task silent for
    # jobs.stall_seconds (counted from here, or from its start) is stalled.
    progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # Not stored: seconds since the last progress of a stalled running task, set by the TaskStore that read the row.
    stalled_seconds = None


class SchedulerRow(Base):
    """A server's scheduler on the store: who it is and when it was last seen alive."""

    __tablename__ = "schedulers"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EventRow(Base):
    """A per-step metric record or a log line of a task."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    type: Mapped[str] = mapped_column(String(16))
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class TaskOut(BaseModel):
    """A task as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: TaskKind
    status: TaskStatus
    request: ClientJson
    progress: float
    current_step: int
    total_steps: int | None
    epoch: float | None
    loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    metrics: ClientJson | None
    error: str | None
    output_dir: ClientPath | None = Field(..., description="Relative to its root; output_root names the root.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress_at: datetime | None = Field(
        None, description="When the running task last reported progress (a step, a metric or a log event)."
    )
    stalled: bool = Field(
        False,
        description="Running, but no progress for jobs.stall_seconds: its worker may be stopped or hung "
        "(eta_seconds is null meanwhile).",
    )
    stalled_seconds: float | None = Field(None, description="While stalled: seconds since the last progress.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output_root(self) -> str | None:
        """The root holding output_dir: model, data or allowed_roots[i]."""
        return root_role(self.output_dir)

    @model_validator(mode="after")
    def _stall(self) -> "TaskOut":
        """A stalled task has no ETA."""
        self.stalled = self.stalled_seconds is not None
        if self.stalled:
            self.eta_seconds = None
        return self


class TaskList(BaseModel):
    """One page of tasks, newest first."""

    items: list[TaskOut]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    """One task event."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: str
    created_at: datetime
    type: str
    level: str
    message: str | None
    data: ClientJson | None


class EventList(BaseModel):
    """Events of a task after a given id."""

    task_id: str
    status: TaskStatus
    items: list[EventOut]
    next_after: int
