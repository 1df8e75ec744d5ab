"""The answer of a route that starts a task: 202 at once, or with `wait` 200 and the finished task."""

from fastapi import Response

from entity.task import TaskOut, TaskRow
from service.tasks import TaskStore


async def queued_or_finished(task: TaskRow, wait: bool, store: TaskStore, poll: float, response: Response) -> TaskOut:
    """Set 202 and return the queued task, or wait (off the event loop) and return it finished."""
    if not wait:
        response.status_code = 202
        return TaskOut.model_validate(task)
    return TaskOut.model_validate(await store.wait_terminal(task.id, poll))
