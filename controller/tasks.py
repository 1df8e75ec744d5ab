"""The answer of a route that starts a task: 202 at once, or with `wait` 200 and the finished task."""

from fastapi import Response

from entity.task import TERMINAL_STATUSES, TaskOut, TaskRow
from service.tasks import TaskStore


async def queued_or_finished(
    task: TaskRow, wait: bool, store: TaskStore, poll: float, response: Response, timeout: float | None = None
) -> TaskOut:
    """Set 202 and return the queued task, or wait (off the event loop) and return it finished.

    A wait longer than `timeout` seconds (jobs.wait_timeout_seconds) ends with 202 and the task as it stands.
    """
    if not wait:
        response.status_code = 202
        return TaskOut.model_validate(task)
    final = await store.wait_terminal(task.id, poll, timeout)
    if final.status not in TERMINAL_STATUSES:
        response.status_code = 202
    return TaskOut.model_validate(final)
