"""Training routes: start, status, list, cancel, logs and live events."""

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from controller.deps import RunnerDep, StoreDep, TrainServiceDep
from controller.openapi import body_schema, error_responses
from entity import examples
from entity.common import MAX_SQL_INT
from entity.task import TERMINAL_STATUSES, EventList, EventOut, TaskKind, TaskList, TaskOut, TaskStatus
from entity.train import TrainRequest, TrainStarted
from service.tasks import TaskStore
from util.errors import InvalidInputError, UnsupportedMediaTypeError

router = APIRouter(prefix="/api/train", tags=["train"])

YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
_SCHEMA = body_schema(TrainRequest)  # one schema in the components, shared by both media types
TRAIN_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The train request as JSON, or the same document as YAML (a `wintrain train start --config` "
        "file).",
        "content": {
            "application/json": {"schema": _SCHEMA, "examples": examples.TRAIN},
            "application/yaml": {"schema": _SCHEMA},
        },
    }
}


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-4` and `1.0e4` as numbers, as JSON and YAML 1.2 do (YAML 1.1 reads text)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_document(raw: bytes, content_type: str) -> Any:
    """A request body as data: YAML for the YAML media types, JSON otherwise (refusing anything else)."""
    media = content_type.split(";")[0].strip().lower()
    if media in YAML_TYPES:
        try:
            return yaml.load(raw.decode("utf-8"), Loader=_YamlLoader)  # a SafeLoader: plain data only
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"The body is not valid YAML: {exc}") from exc
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"Send the train request as application/json or application/yaml, not {media}.",
            details={"content_type": media},
        )
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"The body is not valid JSON: {exc}") from exc


async def train_body(request: Request) -> TrainRequest:
    """The train request from a JSON or YAML body, checked field by field like any request body."""
    data = parse_document(await request.body(), request.headers.get("content-type", ""))
    if not isinstance(data, dict):
        raise InvalidInputError("The train request must be a mapping of fields (strategy, dataset_path, config, ...).")
    try:
        return TrainRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_context=False)]
        raise RequestValidationError(errors) from exc


@router.post(
    "/start",
    response_model=TrainStarted,
    status_code=202,
    summary="Start a training task",
    responses=error_responses(403, 404, 409, 415, 422, 429),
    openapi_extra=TRAIN_BODY_DOC,
)
def start(req: Annotated[TrainRequest, Depends(train_body)], service: TrainServiceDep) -> TrainStarted:
    """Queue a training task (JSON or YAML body) and return its id at once."""
    task = service.start(req)
    return TrainStarted(task_id=task.id, status=task.status, output_dir=task.output_dir or "")


@router.get("/status/{task_id}", response_model=TaskOut, summary="Get a task's status", responses=error_responses(404))
def status(task_id: str, store: StoreDep) -> TaskOut:
    """A task's status, progress and outcome."""
    return TaskOut.model_validate(store.get(task_id))


@router.get("/tasks", response_model=TaskList, summary="List tasks", responses=error_responses(422))
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


@router.post("/cancel/{task_id}", response_model=TaskOut, summary="Cancel a task", responses=error_responses(404, 409))
def cancel(task_id: str, runner: RunnerDep) -> TaskOut:
    """Cancel a queued or running task (409 if it already finished)."""
    return TaskOut.model_validate(runner.cancel(task_id))


@router.get(
    "/logs/{task_id}", response_model=EventList, summary="Get a task's events", responses=error_responses(404, 422)
)
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


@router.get(
    "/events/{task_id}",
    response_class=EventSourceResponse,
    summary="Stream a task's events (SSE)",
    responses=error_responses(404, 422),
)
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
