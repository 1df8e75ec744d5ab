"""Execution backends of the job runner: where a claimed task's worker runs.

The local backend (child processes of the server, `service.jobs.spawn_worker`) is built into `JobRunner` and is
the default. Other backends implement `TaskBackend` and are imported only when configured (`jobs.backend`), so
the local path never imports their dependencies (Ray).
"""

from pathlib import Path
from typing import NamedTuple, Protocol

from entity.task import TaskRow


class Room(NamedTuple):
    """The most one task may use: GPUs, and processes when there are no GPUs, on the place it runs (`where`)."""

    gpus: int
    cpu_processes: int
    where: str


class TaskHandle(Protocol):
    """One running task on a backend."""

    def end_reason(self) -> str | None:
        """Why the worker ended (exit status or failure reason), or None while it runs."""
        ...

    def kill(self, grace: float) -> None:
        """Stop the worker (SIGTERM, SIGKILL after `grace` seconds) and free what it reserved."""
        ...

    def signal(self, signum: int) -> bool:
        """Send a signal to the worker (SIGUSR1: pause); whether it was delivered."""
        ...

    def describe(self) -> dict[str, object]:
        """What to put in the task's `running` event (backend, actor name, ...)."""
        ...


class TaskBackend(Protocol):
    """Starts, adopts and kills task workers somewhere other than this process's children."""

    def connect(self) -> None:
        """Attach to (or start) the execution engine; raise on failure."""
        ...

    def capacity(self) -> int:
        """How many single-process tasks may run at once when jobs.max_concurrent_jobs is unset."""
        ...

    def cost(self, task: TaskRow) -> int:
        """How many of those slots a task takes."""
        ...

    def room(self) -> Room:
        """The most one task may use: the largest live node's GPUs (or CPU processes)."""
        ...

    def start(self, task: TaskRow, log_path: Path) -> TaskHandle:
        """Start the worker of a claimed task; raise on failure."""
        ...

    def adopt(self, task: TaskRow, log_path: Path) -> TaskHandle | None:
        """The handle of a running task's worker left by a previous server, or None when it is gone."""
        ...

    def kill_orphan(self, task: TaskRow, grace: float) -> bool:
        """Kill the worker of a task this runner does not track (started by another server); whether one was found."""
        ...

    def close(self) -> None:
        """Detach from the engine (and stop it when this backend started it)."""
        ...


def make_backend(name: str, settings: object) -> TaskBackend:
    """The backend named by jobs.backend (imported lazily)."""
    if name == "ray":
        from service.backends.ray_backend import RayBackend

        return RayBackend(settings)  # type: ignore[arg-type]
    raise ValueError(f"Unknown jobs.backend '{name}'.")
