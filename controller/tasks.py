"""The answer of a route that starts a task: 202 at once, or with `wait` 200 and the finished task."""

from fastapi import Response

from entity.task import TaskKind, TaskOut, TaskRow
from service.tasks import TaskStore
from util.errors import NotFoundError


def task_of_kind(store: TaskStore, task_id: str, kind: TaskKind) -> TaskOut:
    """A task by id, 404 unless it is of `kind` (an eval status route does not show a training run)."""
    task = store.get(task_id)
    if task.kind != kind:
        raise NotFoundError(
            f"No {kind} task with id '{task_id}': it is a {task.kind} task (GET /api/train/status/{task_id} shows "
            "tasks of every kind).",
            details={"task_id": task_id, "kind": task.kind},
        )
    return TaskOut.model_validate(task)


async def queued_or_finished(task: TaskRow, wait: bool, store: TaskStore, poll: float, response: Response) -> TaskOut:
    """Set 202 and return the queued task, or wait (off the event loop) and return it finished."""
    if not wait:
        response.status_code = 202
        return TaskOut.model_validate(task)
    return TaskOut.model_validate(await store.wait_terminal(task.id, poll))
