"""Evaluation routes: start an evaluation (optionally waiting for it) and read its state."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Body, Response

from controller.deps import EvalServiceDep, SettingsDep, StoreDep
from controller.openapi import error_responses
from controller.tasks import queued_or_finished
from entity import examples
from entity.eval import EvalRequest, EvalStarted
from entity.task import TaskKind, TaskOut

router = APIRouter(prefix="/api/eval", tags=["eval"])


@router.post(
    "/evaluate",
    response_model=EvalStarted,
    status_code=200,
    summary="Start an evaluation",
    responses={202: {"model": EvalStarted, "description": "Queued (without wait)."}}
    | error_responses(403, 404, 409, 422, 429),
)
async def evaluate(
    req: Annotated[EvalRequest, Body(openapi_examples=examples.EVAL)],
    service: EvalServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> EvalStarted:
    """Queue an eval task (202), or with `wait` return it finished (200), succeeded or failed."""
    task = await asyncio.to_thread(service.start, req)  # reads the dataset: keep it off the event loop
    jobs = settings.jobs
    final = await queued_or_finished(task, req.wait, store, jobs.poll_interval, response, jobs.wait_timeout_seconds)
    return EvalStarted(
        task_id=task.id, status=final.status, output_dir=task.output_dir or "", task=final if req.wait else None
    )


@router.get(
    "/status/{task_id}",
    response_model=TaskOut,
    summary="Get an evaluation's status and results",
    responses=error_responses(404),
)
def status(task_id: str, store: StoreDep) -> TaskOut:
    """An eval task's state (404 for a task of another kind); its metrics hold the results once it has finished."""
    return TaskOut.model_validate(store.get_of_kind(task_id, TaskKind.eval))
