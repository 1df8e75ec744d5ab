"""The durable task store: SQLite through SQLAlchemy, shared by the server and job processes."""

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

import entity.runs  # noqa: F401  - registers the run tables on the shared metadata
from entity.task import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Base,
    EventRow,
    TaskKind,
    TaskRow,
    TaskStatus,
    utcnow,
)
from util.errors import AppError, ConflictError, NotFoundError

PROGRESS_FIELDS = {
    "progress",
    "current_step",
    "total_steps",
    "epoch",
    "loss",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "metrics",  # a train task's data statistics, known before its first step
}


class QueueFullError(AppError):
    """The configured limit of queued tasks is reached."""

    status_code = 429
    error_type = "queue_full"


def lock_for_write(session: Session) -> None:
    """Take SQLite's write lock now (BEGIN IMMEDIATE), so a check-then-insert in this session is atomic.

    Must be the session's first statement. Another writer waits here (up to the busy timeout) until this
    session commits, so two requests can never both pass a limit check before either has inserted.
    """
    session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(db_path: Path) -> Engine:
    """Create an engine for one process: WAL mode and a busy timeout so several processes can write."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    Base.metadata.create_all(engine)
    return engine


class TaskStore:
    """CRUD and atomic status transitions for tasks and their events."""

    def __init__(self, db_path: Path) -> None:
        """Open (and create if needed) the store at `db_path`."""
        self.engine = make_engine(db_path)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s, s.begin():
            yield s

    @staticmethod
    def new_id() -> str:
        """A fresh task id."""
        return uuid.uuid4().hex

    def create(
        self,
        kind: TaskKind,
        request: dict[str, Any],
        output_dir: str | None = None,
        task_id: str | None = None,
        max_queued: int | None = None,
        retry_after: int = 30,
    ) -> TaskRow:
        """Insert a queued task, atomically refusing a busy `output_dir` (409) or a full queue (429)."""
        row = TaskRow(
            id=task_id or self.new_id(),
            kind=kind,
            status=TaskStatus.queued,
            request=request,
            output_dir=output_dir,
            created_at=utcnow(),
        )
        active = [st.value for st in ACTIVE_STATUSES]
        with self.session() as s:
            lock_for_write(s)
            if output_dir is not None:
                busy = s.scalar(
                    select(TaskRow.id).where(TaskRow.output_dir == output_dir, TaskRow.status.in_(active)).limit(1)
                )
                if busy is not None:
                    raise ConflictError(
                        f"Task {busy} is already writing to '{output_dir}'.",
                        details={"output_dir": output_dir, "task_id": busy},
                    )
            if max_queued is not None:
                queued = s.scalar(select(func.count()).select_from(TaskRow).where(TaskRow.status == TaskStatus.queued))
                if (queued or 0) >= max_queued:
                    err = QueueFullError(
                        f"{queued} tasks are already queued (jobs.max_queued = {max_queued}); retry later.",
                        details={"max_queued": max_queued, "queued": queued},
                    )
                    err.headers = {"Retry-After": str(retry_after)}
                    raise err
            s.add(row)
        return row

    def get(self, task_id: str) -> TaskRow:
        """Return a task or raise NotFoundError."""
        with self.session() as s:
            row = s.get(TaskRow, task_id)
        if row is None:
            raise NotFoundError(f"Task '{task_id}' does not exist.", details={"task_id": task_id})
        return row

    def get_of_kind(self, task_id: str, kind: str) -> TaskRow:
        """Return a task of one kind; a task of another kind is NotFoundError, as under that kind's routes."""
        row = self.get(task_id)
        if row.kind != kind:
            raise NotFoundError(
                f"Task '{task_id}' is a {row.kind} task, not an {kind} task (/api/train/status shows any task).",
                details={"task_id": task_id, "kind": row.kind},
            )
        return row

    async def wait_terminal(self, task_id: str, poll: float, timeout: float | None = None) -> TaskRow:
        """Poll (off the event loop) until a task has finished, or `timeout` seconds pass; return it as it is."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            task = await asyncio.to_thread(self.get, task_id)
            if task.status not in [s.value for s in ACTIVE_STATUSES]:
                return task
            if deadline is not None and loop.time() >= deadline:
                return task
            await asyncio.sleep(poll if deadline is None else max(0.0, min(poll, deadline - loop.time())))

    def page(
        self,
        status: TaskStatus | None = None,
        kind: TaskKind | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[TaskRow], int]:
        """A page of tasks, newest first, and the total matching count."""
        query = select(TaskRow)
        count = select(func.count()).select_from(TaskRow)
        if status is not None:
            query = query.where(TaskRow.status == status)
            count = count.where(TaskRow.status == status)
        if kind is not None:
            query = query.where(TaskRow.kind == kind)
            count = count.where(TaskRow.kind == kind)
        query = query.order_by(TaskRow.created_at.desc(), TaskRow.id).limit(limit).offset(offset)
        with self.session() as s:
            rows = list(s.scalars(query))
            total = s.scalar(count) or 0
        return rows, total

    def active_with_output(self, output_dir: str) -> list[TaskRow]:
        """Queued or running tasks that write to `output_dir`."""
        query = select(TaskRow).where(
            TaskRow.output_dir == output_dir, TaskRow.status.in_([s.value for s in ACTIVE_STATUSES])
        )
        with self.session() as s:
            return list(s.scalars(query))

    def with_status(self, status: TaskStatus) -> list[TaskRow]:
        """All tasks in one status, oldest first (the scheduler's queue order)."""
        with self.session() as s:
            return list(s.scalars(select(TaskRow).where(TaskRow.status == status).order_by(TaskRow.created_at)))

    def counts(self) -> dict[str, int]:
        """Number of tasks per status, plus the total."""
        with self.session() as s:
            rows = s.execute(select(TaskRow.status, func.count()).group_by(TaskRow.status)).all()
        result = {status.value: 0 for status in TaskStatus}
        result.update({status: n for status, n in rows})
        result["total"] = sum(n for _, n in rows)
        return result

    def transition(
        self,
        task_id: str,
        to: TaskStatus,
        allowed_from: tuple[TaskStatus, ...],
        **fields: Any,
    ) -> bool:
        """Atomically move a task to `to` only if it is in `allowed_from`; return whether it moved."""
        values: dict[str, Any] = {"status": to, **fields}
        if to == TaskStatus.running:
            values.setdefault("started_at", utcnow())
        if to not in ACTIVE_STATUSES:
            values.setdefault("finished_at", utcnow())
        stmt = (
            update(TaskRow)
            .where(TaskRow.id == task_id, TaskRow.status.in_([s.value for s in allowed_from]))
            .values(**values)
        )
        with self.session() as s:
            return s.execute(stmt).rowcount == 1

    def move(
        self,
        task_id: str,
        to: TaskStatus,
        allowed_from: tuple[TaskStatus, ...],
        message: str | None = None,
        **fields: Any,
    ) -> bool:
        """Transition like `transition` and, if the task moved, record a status event."""
        moved = self.transition(task_id, to, allowed_from, **fields)
        if moved:
            data: dict[str, Any] = {"status": to.value}
            if fields.get("metrics"):
                data["metrics"] = fields["metrics"]
            level = "error" if to == TaskStatus.failed else "info"
            self.add_event(task_id, "status", message or to.value, data, level=level)
        return moved

    def set_pid(self, task_id: str, pid: int) -> None:
        """Record the pid of a task's worker process."""
        with self.session() as s:
            s.execute(update(TaskRow).where(TaskRow.id == task_id).values(pid=pid))

    def update_progress(self, task_id: str, **fields: Any) -> None:
        """Write the latest progress fields of a running task."""
        unknown = set(fields) - PROGRESS_FIELDS
        if unknown:
            raise ValueError(f"Not progress fields: {sorted(unknown)}")
        with self.session() as s:
            s.execute(update(TaskRow).where(TaskRow.id == task_id).values(**fields))

    def add_event(
        self,
        task_id: str,
        type_: str,
        message: str | None = None,
        data: dict[str, Any] | None = None,
        level: str = "info",
    ) -> int:
        """Append an event to a task and return its id."""
        row = EventRow(task_id=task_id, type=type_, message=message, data=data, level=level, created_at=utcnow())
        with self.session() as s:
            s.add(row)
            s.flush()
            return row.id

    def purge_events(self, finished_before: datetime) -> list[str]:
        """Delete the events of tasks that finished before a time; return those tasks' ids (the tasks stay)."""
        terminal = [s.value for s in TERMINAL_STATUSES]
        old = select(TaskRow.id).where(TaskRow.status.in_(terminal), TaskRow.finished_at < finished_before)
        with self.session() as s:
            ids = list(s.scalars(old))
            for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                s.execute(delete(EventRow).where(EventRow.task_id.in_(ids[start : start + 500])))
        return ids

    def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[EventRow]:
        """Events of a task with id greater than `after`, oldest first."""
        query = (
            select(EventRow).where(EventRow.task_id == task_id, EventRow.id > after).order_by(EventRow.id).limit(limit)
        )
        with self.session() as s:
            return list(s.scalars(query))
