"""The durable task store (SQLite or PostgreSQL through SQLAlchemy), shared by the servers and job processes."""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

import entity.runs  # noqa: F401  - registers the run tables on the shared metadata
from entity.task import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    EventRow,
    SchedulerRow,
    TaskKind,
    TaskRow,
    TaskStatus,
    utcnow,
)
from service.db import (
    STORE_ERRORS,
    DiskReserve,
    is_disk_full,
    is_postgres,
    lock_for_write,
    make_engine,
    sqlite_file,
    store_error_text,
)
from util.errors import AppError, ConflictError, NotFoundError

__all__ = ["QueueFullError", "TaskStore", "lock_for_write", "make_engine"]
log = logging.getLogger(__name__)

DISK_FULL_ERROR_CHARS = 1000  # a failure recorded on a full disk keeps this much of its error text
DISK_FULL_MEMORY_SECONDS = 60.0  # /health reports a full disk met by this store for this long

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


def nested_output(s: Session, output_dir: str) -> str | None:
    """The id of a queued, running or paused task whose output holds `output_dir` or lies inside it (not equal)."""
    wanted = Path(output_dir)
    statuses = [st.value for st in (*ACTIVE_STATUSES, TaskStatus.paused)]
    rows = s.execute(
        select(TaskRow.id, TaskRow.output_dir).where(TaskRow.output_dir.is_not(None), TaskRow.status.in_(statuses))
    ).all()
    for task_id, other in rows:
        other_path = Path(other)
        if other_path != wanted and (other_path in wanted.parents or wanted in other_path.parents):
            return task_id
    return None


class TaskStore:
    """CRUD and atomic status transitions for tasks and their events."""

    def __init__(self, db: str | Path, best_effort_reports: bool = False) -> None:
        """Open (creating or migrating as needed) the store at a SQLAlchemy URL or a SQLite file path.

        best_effort_reports (workers): progress and events that the database does not take are logged and dropped,
        so an outage loses some points of a curve, not the task.
        """
        self.engine = make_engine(db)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.best_effort_reports = best_effort_reports
        self.reserve = DiskReserve(sqlite_file(self.engine))  # spare space for an outcome on a full disk
        self.stall_seconds: float | None = None  # set by the server (jobs.stall_seconds): rows read are flagged
        self._disk_full_at = 0.0  # when this store (or its server's scheduler) last met a full disk; 0: never

    def note_disk_full(self) -> None:
        """Remember that a write met a full disk (/health reports it for DISK_FULL_MEMORY_SECONDS)."""
        self._disk_full_at = time.monotonic()

    def disk_full_recently(self) -> bool:
        """Whether a write met a full disk within the last DISK_FULL_MEMORY_SECONDS."""
        return bool(self._disk_full_at) and time.monotonic() - self._disk_full_at < DISK_FULL_MEMORY_SECONDS

    def _flag_stalled(self, rows: list[TaskRow]) -> list[TaskRow]:
        """Set `stalled_seconds` of each running row silent for stall_seconds (from its last progress, or start)."""
        if self.stall_seconds is None:
            return rows
        now = utcnow()
        for row in rows:
            last = row.progress_at or row.started_at
            if row.status != TaskStatus.running or last is None:
                continue
            idle = (now - last).total_seconds()
            row.stalled_seconds = round(idle, 1) if idle >= self.stall_seconds else None
        return rows

    def stalled_count(self) -> int:
        """Running tasks silent for stall_seconds (0 when the store has no stall_seconds)."""
        if self.stall_seconds is None:
            return 0
        cutoff = utcnow() - timedelta(seconds=self.stall_seconds)
        last = func.coalesce(TaskRow.progress_at, TaskRow.started_at)
        query = select(func.count()).select_from(TaskRow).where(TaskRow.status == TaskStatus.running, last < cutoff)
        with self.session() as s:
            return int(s.scalar(query) or 0)

    @contextmanager
    def _report(self, what: str) -> Iterator[None]:
        """Around a progress or event write: with best_effort_reports, a store error drops the write."""
        try:
            yield
        except STORE_ERRORS as exc:
            if not self.best_effort_reports:
                raise
            log.warning("task store unavailable; dropped a %s write (%s)", what, store_error_text(exc))

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
                nested = nested_output(s, output_dir)
                if nested is not None:
                    raise ConflictError(
                        f"Task {nested} writes to a folder that holds or lies inside '{Path(output_dir).name}'; "
                        "outputs may not be nested (deleting one would delete the other).",
                        details={"output_dir": Path(output_dir).name, "task_id": nested},
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
        return self._flag_stalled([row])[0]

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
        return self._flag_stalled(rows), total

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
        with self.session() as s:
            return self._transition(s, task_id, to, allowed_from, fields)

    @staticmethod
    def _transition(
        s: Session, task_id: str, to: TaskStatus, allowed_from: tuple[TaskStatus, ...], fields: dict[str, Any]
    ) -> bool:
        """The conditional update of `transition`, inside a caller's session."""
        values: dict[str, Any] = {"status": to, **fields}
        if to == TaskStatus.running:
            values.setdefault("started_at", utcnow())
        if to not in ACTIVE_STATUSES:
            values.setdefault("finished_at", utcnow())
        stmt = (
            update(TaskRow)
            .where(TaskRow.id == task_id, TaskRow.status.in_([st.value for st in allowed_from]))
            .values(**values)
        )
        return s.execute(stmt).rowcount == 1

    def move(
        self,
        task_id: str,
        to: TaskStatus,
        allowed_from: tuple[TaskStatus, ...],
        message: str | None = None,
        **fields: Any,
    ) -> bool:
        """Transition like `transition` and, if the task moved, record a status event in the same transaction.

        On a full disk (not an outage: waiting would not help) it gives up the store's reserve (space for a few
        pages) and writes again with the error text shortened; failing still, it writes the status alone (no event,
        no metrics), and then raises the disk-full error.
        """
        try:
            return self._move(task_id, to, allowed_from, message, fields)
        except STORE_ERRORS as exc:
            if not is_disk_full(exc):
                raise
            self.note_disk_full()
            log.warning("disk full while recording task %s as %s (%s)", task_id, to.value, store_error_text(exc))
        self.reserve.release()
        if fields.get("error"):
            fields["error"] = str(fields["error"])[:DISK_FULL_ERROR_CHARS]
        try:
            return self._move(task_id, to, allowed_from, message, fields)
        except STORE_ERRORS as exc:
            if not is_disk_full(exc):
                raise
        bare = {k: v for k, v in fields.items() if k != "metrics"}
        return self.transition(task_id, to, allowed_from, **bare)

    def _move(
        self,
        task_id: str,
        to: TaskStatus,
        allowed_from: tuple[TaskStatus, ...],
        message: str | None,
        fields: dict[str, Any],
    ) -> bool:
        """The transition and its status event, in one transaction."""
        data: dict[str, Any] = {"status": to.value}
        if fields.get("metrics"):
            data["metrics"] = fields["metrics"]
        level = "error" if to == TaskStatus.failed else "info"
        with self.session() as s:
            moved = self._transition(s, task_id, to, allowed_from, fields)
            if moved:
                s.add(
                    EventRow(
                        task_id=task_id,
                        type="status",
                        message=message or to.value,
                        data=data,
                        level=level,
                        created_at=utcnow(),
                    )
                )
        return moved

    def claim_next(self, owner: str, fits: Callable[[TaskRow], bool] = lambda _task: True) -> TaskRow | None:
        """Atomically move the oldest queued task to running for scheduler `owner`, if `fits` accepts it.

        PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent schedulers each take a different row without
        waiting. SQLite: one write transaction (`BEGIN IMMEDIATE`). Either way no two schedulers claim one task, and
        a cancel cannot slip between the read and the update. Returns the claimed task, or None.
        """
        query = select(TaskRow).where(TaskRow.status == TaskStatus.queued).order_by(TaskRow.created_at, TaskRow.id)
        with self.session() as s:  # an idle queue costs a plain read, not the write lock
            if s.scalar(select(TaskRow.id).where(TaskRow.status == TaskStatus.queued).limit(1)) is None:
                return None
        with self.session() as s:
            if is_postgres(s):
                query = query.limit(1).with_for_update(skip_locked=True)
            else:
                lock_for_write(s)
                query = query.limit(1)
            task = s.scalar(query)
            if task is None or not fits(task):
                return None
            now = utcnow()
            s.execute(
                update(TaskRow)
                .where(TaskRow.id == task.id)
                .values(status=TaskStatus.running, owner=owner, started_at=now, progress_at=now, cancel_requested=False)
            )
        task.status, task.owner, task.started_at = TaskStatus.running, owner, now  # detached: a copy for the caller
        task.progress_at = now  # a resumed task's silence counts from this claim, not from its earlier run
        return task

    def register_scheduler(
        self, owner: str, host: str, pid: int, stale_after: float, alive: Callable[[int], bool]
    ) -> None:
        """Record this process as scheduler `owner`; ConflictError if another live process already is.

        The other one counts as gone when it was not seen for `stale_after` seconds, or, on this host, when its
        pid is no longer alive (a server killed and restarted at once).
        """
        now = utcnow()
        with self.session() as s:
            lock_for_write(s)
            row = s.get(SchedulerRow, owner)
            if row is not None and (row.host, row.pid) != (host, pid):
                fresh = row.seen_at > now - timedelta(seconds=stale_after)
                if fresh and (row.host != host or alive(row.pid)):
                    raise ConflictError(
                        f"Scheduler '{owner}' is already running (pid {row.pid} on {row.host}); every server on a "
                        "shared store needs its own jobs.scheduler_id.",
                        details={"scheduler_id": owner, "host": row.host, "pid": row.pid},
                    )
            if row is None:
                s.add(SchedulerRow(owner=owner, host=host, pid=pid, seen_at=now))
            else:
                row.host, row.pid, row.seen_at = host, pid, now

    def scheduler_seen(self, owner: str, pid: int) -> None:
        """Refresh a scheduler's heartbeat."""
        stmt = update(SchedulerRow).where(SchedulerRow.owner == owner, SchedulerRow.pid == pid)
        with self.session() as s:
            s.execute(stmt.values(seen_at=utcnow()))

    def unregister_scheduler(self, owner: str, pid: int) -> None:
        """Forget a scheduler that stopped."""
        with self.session() as s:
            s.execute(delete(SchedulerRow).where(SchedulerRow.owner == owner, SchedulerRow.pid == pid))

    def request_cancel(self, task_id: str) -> bool:
        """Cancel a running task owned by another scheduler: mark it cancelled and ask its owner to kill the worker."""
        stmt = (
            update(TaskRow)
            .where(TaskRow.id == task_id, TaskRow.status == TaskStatus.running)
            .values(status=TaskStatus.cancelled, finished_at=utcnow(), cancel_requested=True)
        )
        with self.session() as s:
            moved = s.execute(stmt).rowcount == 1
        if moved:
            self.add_event(task_id, "status", "cancelled", {"status": TaskStatus.cancelled.value})
        return moved

    def owned_cancel_requests(self, owner: str) -> list[TaskRow]:
        """Tasks of `owner` whose cancel, sent to another server, the owner has not carried out yet."""
        query = select(TaskRow).where(TaskRow.owner == owner, TaskRow.cancel_requested)
        with self.session() as s:
            return list(s.scalars(query))

    def cancel_requests(self, task_ids: list[str]) -> list[str]:
        """Which of these tasks have a cancel pending for their owner (cleared as they are returned)."""
        if not task_ids:
            return []
        with self.session() as s:
            ids = list(s.scalars(select(TaskRow.id).where(TaskRow.id.in_(task_ids), TaskRow.cancel_requested)))
            if ids:
                s.execute(update(TaskRow).where(TaskRow.id.in_(ids)).values(cancel_requested=False))
        return ids

    def set_pid(self, task_id: str, pid: int) -> None:
        """Record the pid of a task's worker process."""
        with self.session() as s:
            s.execute(update(TaskRow).where(TaskRow.id == task_id).values(pid=pid))

    def update_progress(self, task_id: str, **fields: Any) -> None:
        """Write the latest progress fields of a running task."""
        unknown = set(fields) - PROGRESS_FIELDS
        if unknown:
            raise ValueError(f"Not progress fields: {sorted(unknown)}")
        with self._report("progress"), self.session() as s:
            s.execute(update(TaskRow).where(TaskRow.id == task_id).values(**fields, progress_at=utcnow()))

    def add_event(
        self,
        task_id: str,
        type_: str,
        message: str | None = None,
        data: dict[str, Any] | None = None,
        level: str = "info",
    ) -> int:
        """Append an event to a task and return its id (0 when a best-effort report was dropped).

        An event is progress too: the task's progress_at moves with it (in the same transaction).
        """
        row = EventRow(task_id=task_id, type=type_, message=message, data=data, level=level, created_at=utcnow())
        with self._report("event"), self.session() as s:
            s.add(row)
            s.flush()
            s.execute(update(TaskRow).where(TaskRow.id == task_id).values(progress_at=row.created_at))
            return row.id
        return 0

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
