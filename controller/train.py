"""Training routes: start, status, list, cancel, logs and live events."""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from controller.deps import RunnerDep, StoreDep, TrainServiceDep
from entity.common import MAX_SQL_INT
from entity.task import TERMINAL_STATUSES, EventList, EventOut, TaskKind, TaskList, TaskOut, TaskStatus
from entity.train import TrainRequest, TrainStarted
from service.tasks import TaskStore

router = APIRouter(prefix="/api/train", tags=["train"])


@router.post("/start", response_model=TrainStarted, status_code=202)
def start(req: TrainRequest, service: TrainServiceDep) -> TrainStarted:
    """Queue a training task and return its id at once."""
    task = service.start(req)
    return TrainStarted(task_id=task.id, status=task.status, output_dir=task.output_dir or "")


@router.get("/status/{task_id}", response_model=TaskOut)
def status(task_id: str, store: StoreDep) -> TaskOut:
    """A task's status, progress and outcome."""
    return TaskOut.model_validate(store.get(task_id))


@router.get("/tasks", response_model=TaskList)
def tasks(
    store: StoreDep,
    status: TaskStatus | None = None,
    kind: TaskKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
) -> TaskList:
    """List tasks of every kind, newest first, filterable by status and kind."""
    rows, total = store.page(status, kind, limit, offset)
    return TaskList(items=[TaskOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.post("/cancel/{task_id}", response_model=TaskOut)
def cancel(task_id: str, runner: RunnerDep) -> TaskOut:
    """Cancel a queued or running task (409 if it already finished)."""
    return TaskOut.model_validate(runner.cancel(task_id))


@router.get("/logs/{task_id}", response_model=EventList)
def logs(
    task_id: str,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SQL_INT, description="Return events with an id above this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> EventList:
    """A task's events (status changes, per-step metrics, log lines)."""
    task = store.get(task_id)
    items = [EventOut.model_validate(e) for e in store.events(task_id, after, limit)]
    return EventList(task_id=task_id, status=task.status, items=items, next_after=items[-1].id if items else after)


async def _event_stream(store: TaskStore, task_id: str, after: int, request: Request) -> AsyncIterator[ServerSentEvent]:
    """Yield new events until the task is finished and drained, or the client leaves."""
    poll = request.app.state.settings.jobs.poll_interval
    while not await request.is_disconnected():
        events = await asyncio.to_thread(store.events, task_id, after, 500)
        for event in events:
            after = event.id
            yield ServerSentEvent(
                data=EventOut.model_validate(event).model_dump_json(), id=str(event.id), event=event.type
            )
        if not events:
            task = await asyncio.to_thread(store.get, task_id)
            if task.status in TERMINAL_STATUSES:
                final = TaskOut.model_validate(task).model_dump_json()
                yield ServerSentEvent(data=final, event="end")
                return
            await asyncio.sleep(poll)


@router.get("/events/{task_id}", response_class=EventSourceResponse)
def events(
    task_id: str,
    request: Request,
    store: StoreDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
) -> EventSourceResponse:
    """Stream a task's events over SSE until it ends; resumes after Last-Event-ID."""
    store.get(task_id)  # 404 before the stream starts
    if last_event_id and last_event_id.isdigit() and len(last_event_id) < 19:  # below 2**63: SQLite's range
        after = max(after, int(last_event_id))
    return EventSourceResponse(_event_stream(store, task_id, after, request), ping=15)
