"""Entry point of a task's child process: `python -m service.worker --task-id ID`."""

import argparse
import ctypes
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from entity.task import TaskKind, TaskStatus
from service.db import STORE_ERRORS, is_disk_full, retry_store, store_error_text
from service.tasks import TaskStore
from service.train import pause
from util.settings import Settings

TRACEBACK_LINES = 30
SETTINGS_ENV = "WT_SETTINGS_JSON"  # how service.jobs.spawn_worker hands the settings to a worker process
DIE_WITH_PARENT_ENV = "WT_DIE_WITH_PARENT"  # set: the worker gets SIGKILL when its parent dies (Ray actors)
PR_SET_PDEATHSIG = 1
OUTCOME_RETRY_SECONDS = 600.0  # how long a finished worker waits for the database to take its outcome
# The exit status of a worker that could not record its outcome because the disk is full (ENOSPC's number): the
# server then records the failure itself (service.jobs.describe_exit), once the store can take it.
DISK_FULL_EXIT = 28

Handler = Callable[[Settings, TaskStore, str, dict[str, Any]], dict[str, Any]]


def _train_handler(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run a training task (imported lazily: it pulls in torch and TRL)."""
    from service.train.runner import run_training

    return run_training(settings, store, task_id, request)


def _export_handler(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run an export task (ONNX, merged weights or archive)."""
    from service.export import run_export

    return run_export(settings, store, task_id, request)


def _eval_handler(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run an evaluation task."""
    from service.eval import run_eval

    return run_eval(settings, store, task_id, request)


HANDLERS: dict[str, Handler] = {
    TaskKind.train: _train_handler,
    TaskKind.export: _export_handler,
    TaskKind.eval: _eval_handler,
}


class Terminated(BaseException):
    """Raised in the worker when it receives SIGTERM (cancel, or server shutdown)."""


def _on_sigterm(signum: int, frame: object) -> None:
    """Unwind the task promptly; the server has already recorded why it stopped us."""
    raise Terminated("worker process received SIGTERM")


def die_with_parent() -> None:
    """Receive SIGKILL when the parent process dies (Linux prctl; a no-op elsewhere), so no worker is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


def start_worker_process() -> Settings:
    """The settings the server passed (service.jobs.spawn_worker), logging set up, SIGTERM raising Terminated."""
    if os.environ.get(DIE_WITH_PARENT_ENV):  # a rank under torchrun: end with torchrun, which ends with its actor
        die_with_parent()
        if os.getppid() == 1:
            sys.exit(143)  # the parent was already gone
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    pause.install()  # a paused training task saves a checkpoint and exits; others end as on SIGTERM later
    return settings


def format_error(exc: BaseException) -> str:
    """A readable message, then the traceback's header and its last frames."""
    lines = "".join(traceback.format_exception(exc)).splitlines()
    if len(lines) > TRACEBACK_LINES:
        lines = [lines[0], "  ...", *lines[-TRACEBACK_LINES:]]
    return f"{type(exc).__name__}: {exc}\n" + "\n".join(lines)


def run_task(settings: Settings, task_id: str) -> int:
    """Execute one claimed task and record its outcome; return the process exit code.

    Under torchrun every rank runs this: any rank records a failure (the first one wins), rank 0 the success.
    A database outage is waited out (up to OUTCOME_RETRY_SECONDS); a full disk is not an outage: when even the
    store's reserve cannot take the outcome, the worker exits at once with DISK_FULL_EXIT.
    """
    try:
        return _run_task(settings, task_id)
    except STORE_ERRORS as exc:
        if not is_disk_full(exc):
            raise
        with suppress(OSError):  # the log file may be on the full disk too
            print(
                f"could not record the outcome of task {task_id}: disk full ({store_error_text(exc)})",
                file=sys.stderr,
            )
        return DISK_FULL_EXIT


def _run_task(settings: Settings, task_id: str) -> int:
    """run_task's body."""
    rank = int(os.environ.get("RANK", "0"))
    store = TaskStore(settings.database_url, best_effort_reports=True)  # an outage drops progress, not the task
    task = store.get(task_id)
    if task.status != TaskStatus.running:
        return 0  # cancelled between claim and start: nothing to do
    handler = HANDLERS.get(task.kind)

    def record(status: TaskStatus, message: str | None = None, **fields: Any) -> None:
        """Record the outcome, waiting out a database outage (it is what the task was for)."""
        move = lambda: store.move(task_id, status, (TaskStatus.running,), message, **fields)  # noqa: E731
        retry_store(move, OUTCOME_RETRY_SECONDS, f"recording task {task_id} as {status.value}")

    try:
        if handler is None:
            raise ValueError(f"No handler for task kind '{task.kind}'.")
        metrics = handler(settings, store, task_id, task.request)
    except Terminated as exc:
        record(TaskStatus.failed, str(exc), error=str(exc))
        return 143
    except BaseException as exc:  # noqa: BLE001 - every failure must land in the store
        where = f"rank {rank}: " if "RANK" in os.environ else ""
        if is_disk_full(exc):
            where += "disk full: "
        error = where + format_error(exc)
        record(TaskStatus.failed, f"failed: {where}{type(exc).__name__}: {exc}", error=error)
        return 1
    if metrics.get("paused"):  # the server marked it paused before signalling; this covers a stray signal
        record(TaskStatus.paused, "paused")
        return 0
    if rank == 0:
        record(TaskStatus.succeeded, metrics=metrics, progress=100.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the settings the server passed, and run the task."""
    parser = argparse.ArgumentParser(description="Run one background task.")
    parser.add_argument("--task-id", required=True)
    args = parser.parse_args(argv)
    return run_task(start_worker_process(), args.task_id)


if __name__ == "__main__":
    sys.exit(main())
