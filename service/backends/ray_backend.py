"""Tasks on a Ray cluster (`jobs.backend: ray`): each task's worker runs under a detached Ray actor.

The actor reserves the task's CPUs and GPUs, so Ray places it on whichever node has them. In its constructor it
starts the same worker process a local task gets (`service.jobs.spawn_worker`: `python -m service.worker
--task-id ID`, the server's settings, no API keys, output to the task's log file), so the worker reports into
the shared store exactly as a local one does. That child dies with the actor (PR_SET_PDEATHSIG), so `ray.kill`
of the actor always ends the worker and frees its resources. The actor is named `wt-task-<task id>` in the
`win-train` namespace, which is how a restarted server finds (adopts) the workers of an external cluster.
"""

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from entity.task import TaskRow
from service.backends import Room
from service.jobs import describe_exit, spawn_worker, task_processes, terminate_group, worker_args, worker_environment
from service.worker import DIE_WITH_PARENT_ENV, die_with_parent
from util.settings import PROJECT_ROOT, Settings

log = logging.getLogger(__name__)

NAMESPACE = "win-train"
ACTOR_PREFIX = "wt-task-"
REASON_CHARS = 600  # how much of Ray's (long) error text goes into the task's error
TERMINATE_SLACK_SECONDS = 30.0  # how long a cancel waits for the actor's own SIGTERM/SIGKILL pass beyond the grace
RESOURCES_TTL_SECONDS = 2.0  # the scheduler asks for the cluster's size for every queued task: ask Ray this often


def actor_name(task_id: str) -> str:
    """The Ray actor name of a task's worker."""
    return ACTOR_PREFIX + task_id


class TaskActor:
    """Runs one task's worker process on the node Ray placed it on; its methods report and stop that process."""

    def __init__(self, settings_json: str, module_args: list[str], log_path: str) -> None:
        """Start the worker (the same command, settings and environment a local task gets)."""
        settings = Settings.model_validate_json(settings_json)
        # The worker (before exec) and each torchrun rank (DIE_WITH_PARENT_ENV) get SIGKILL when their parent dies,
        # so killing the actor (ray.kill, node loss) never leaves a worker behind holding the GPUs.
        os.environ[DIE_WITH_PARENT_ENV] = "1"
        self.proc = spawn_worker(settings, module_args, Path(log_path), preexec_fn=die_with_parent)

    def pid(self) -> int:
        """The worker's pid on its node."""
        return self.proc.pid

    def exit_code(self) -> int | None:
        """The worker's exit status, or None while it runs."""
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send a signal to the worker (SIGUSR1: pause)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def terminate(self, grace: float) -> int | None:
        """SIGTERM the worker's process tree, SIGKILL it after `grace` seconds; its exit status."""
        terminate_group(self.proc.pid, self.proc, grace)
        return self.proc.poll()


RemoteTaskActor = ray.remote(TaskActor)


def describe_failure(name: str, exc: BaseException) -> str:
    """A readable reason for a Ray failure that took the worker with it (actor killed, worker crashed, node died)."""
    text = " ".join(str(exc).split())
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS] + "..."
    kind = "Ray actor died" if isinstance(exc, RayActorError) else "Ray failure"
    return f"{kind} ({type(exc).__name__}, actor {name}): {text}"


class RayTaskHandle:
    """One task's actor, as the job runner polls and cancels it."""

    def __init__(self, actor: Any, name: str, resources: dict[str, float]) -> None:
        """Track an actor; `resources` is what it reserved (for the task's events)."""
        self.actor = actor
        self.name = name
        self.resources = resources
        self._started = actor.pid.remote()  # ready once the actor exists and its worker was started
        self._pending: Any = None

    def end_reason(self) -> str | None:
        """Why the worker ended, or None while it runs (or waits for the resources it reserved)."""
        if self._pending is None:
            self._pending = self.actor.exit_code.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            return None
        ref, self._pending = self._pending, None
        try:
            code = ray.get(ref)
        except ActorUnavailableError:
            return None  # transient (a network blip): ask again on the next pass
        except RayError as exc:  # RayActorError (killed, crashed, node died), WorkerCrashedError, NodeDiedError...
            self._kill_actor()
            return describe_failure(self.name, exc)
        if code is None:
            return None
        self._kill_actor()  # the worker is done: release the actor's CPUs and GPUs
        return describe_exit(code)

    def kill(self, grace: float) -> None:
        """SIGTERM the worker through its actor (SIGKILL after `grace`), then ray.kill the actor."""
        ready, _ = ray.wait([self._started], timeout=0)
        if ready:  # the worker exists: give it the same graceful stop a local worker gets
            try:
                ray.get(self.actor.terminate.remote(grace), timeout=grace + TERMINATE_SLACK_SECONDS)
            except (RayError, GetTimeoutError) as exc:
                log.info("terminating actor %s: %s", self.name, exc)
        self._kill_actor()  # still waiting for resources, or after the worker ended: nothing else holds them

    def signal(self, signum: int) -> bool:
        """Send a signal to the worker through its actor; whether it was delivered."""
        try:
            ray.get(self.actor.signal.remote(signum), timeout=TERMINATE_SLACK_SECONDS)
        except (RayError, GetTimeoutError) as exc:
            log.info("signal %s to actor %s: %s", signum, self.name, exc)
            return False
        return True

    def describe(self) -> dict[str, object]:
        """The backend, actor name and reserved resources, for the task's `running` event."""
        return {"backend": "ray", "actor": self.name, "resources": self.resources}

    def _kill_actor(self) -> None:
        """Kill the actor (and with it any worker); already gone is fine."""
        try:
            ray.kill(self.actor, no_restart=True)
        except (RayError, ValueError) as exc:
            log.debug("ray.kill %s: %s", self.name, exc)


@contextlib.contextmanager
def _without_secrets() -> Iterator[None]:
    """Hide the API keys from processes started meanwhile: a local Ray's raylet passes its environment to workers."""
    keep = worker_environment()
    hidden = {name: value for name, value in os.environ.items() if name not in keep}
    for name in hidden:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(hidden)


class RayBackend:
    """Starts task workers as Ray actors that reserve the task's CPUs and GPUs."""

    def __init__(self, settings: Settings) -> None:
        """Bind to settings; connect() attaches to Ray."""
        self.settings = settings
        self._owns = False
        self._cluster: tuple[float, dict[str, float]] = (0.0, {})

    def connect(self) -> None:
        """Attach to jobs.ray_address, or start a private local Ray when it is null (reuses an initialized Ray)."""
        if ray.is_initialized():
            return
        address = self.settings.jobs.ray_address
        options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
        if address is None:
            options.update(address="local", include_dashboard=False)
        else:
            options["address"] = address
        with _without_secrets():
            try:
                ray.init(**options)
            except Exception as exc:  # ConnectionError, RuntimeError, ...: say which setting it was
                where = "start a local Ray" if address is None else f"connect to the Ray cluster at '{address}'"
                raise RuntimeError(f"jobs.backend is ray, but could not {where}: {exc}") from exc
        self._owns = address is None
        log.info("Ray backend attached: %s", ray.cluster_resources())

    def _cluster_resources(self) -> dict[str, float]:
        """The whole cluster's resources (cached for a moment: nodes come and go slowly)."""
        when, resources = self._cluster
        if time.monotonic() - when > RESOURCES_TTL_SECONDS:
            resources = ray.cluster_resources()
            self._cluster = (time.monotonic(), resources)
        return resources

    def _cluster_gpus(self) -> int:
        """GPUs in the whole cluster."""
        return int(self._cluster_resources().get("GPU", 0))

    def capacity(self) -> int:
        """One slot per GPU in the cluster; on a CPU cluster, one per jobs.ray_num_cpus CPUs."""
        resources = self._cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            return gpus
        return max(1, int(resources.get("CPU", 1) // self.settings.jobs.ray_num_cpus))

    def cost(self, task: TaskRow) -> int:
        """Slots a task takes: one per process it runs."""
        return min(task_processes(task), self.capacity())

    def resources(self, task: TaskRow) -> dict[str, float]:
        """What a task's actor reserves: jobs.ray_num_cpus CPUs per process, one GPU per process on a GPU cluster."""
        processes = task_processes(task)
        return {
            "num_cpus": self.settings.jobs.ray_num_cpus * processes,
            "num_gpus": float(processes if self._cluster_gpus() else 0),
        }

    def start(self, task: TaskRow, log_path: Path) -> RayTaskHandle:
        """Create the task's detached, named actor; Ray places it (and so its worker) where the resources are."""
        name = actor_name(task.id)
        resources = self.resources(task)
        self._check_fits_a_node(resources)
        actor = RemoteTaskActor.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",  # outlives this server, so a restarted server can adopt it
            max_restarts=0,  # a restart would run the task twice; a dead actor fails the task instead
            runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
            **resources,
        ).remote(self.settings.model_dump_json(exclude={"auth"}), worker_args(task), str(log_path))
        return RayTaskHandle(actor, name, resources)

    def room(self) -> Room:
        """The largest live node's GPUs, and how many jobs.ray_num_cpus-CPU processes it holds (a task is one node)."""
        nodes = self._live_nodes()
        gpus = max((node.get("GPU", 0) for node in nodes), default=0)
        cpus = max((node.get("CPU", 0) for node in nodes), default=0)
        per = self.settings.jobs.ray_num_cpus
        where = f"the largest node of the Ray cluster ({cpus:g} CPUs, {per:g} per process by jobs.ray_num_cpus)"
        return Room(int(gpus), int(cpus // per), where)

    @staticmethod
    def _live_nodes() -> list[dict[str, float]]:
        """The resources of each live node."""
        return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]

    def _check_fits_a_node(self, resources: dict[str, float]) -> None:
        """Refuse a task no single live node can hold: Ray would keep its actor pending forever."""
        nodes = self._live_nodes()
        wanted = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]}
        if any(all(node.get(key, 0) >= amount for key, amount in wanted.items()) for node in nodes):
            return
        largest = {key: max((node.get(key, 0) for node in nodes), default=0) for key in wanted}
        raise ValueError(
            f"the task needs {wanted['CPU']:g} CPUs and {wanted['GPU']:g} GPUs on one node, but the largest node of "
            f"the Ray cluster has {largest['CPU']:g} CPUs and {largest['GPU']:g} GPUs (jobs.ray_num_cpus is "
            f"{self.settings.jobs.ray_num_cpus:g} per process)"
        )

    def adopt(self, task: TaskRow, log_path: Path) -> RayTaskHandle | None:
        """The actor a previous server started for this task, or None when there is none."""
        try:
            actor = ray.get_actor(actor_name(task.id), namespace=NAMESPACE)
        except ValueError:
            return None
        log.info("adopting Ray actor %s of task %s", actor_name(task.id), task.id)
        return RayTaskHandle(actor, actor_name(task.id), self.resources(task))

    def kill_orphan(self, task: TaskRow, grace: float) -> bool:
        """Kill the actor of a task this runner does not track; whether there was one."""
        handle = self.adopt(task, Path())
        if handle is None:
            return False
        handle.kill(grace)
        return True

    def close(self) -> None:
        """Shut down the local Ray this backend started (its actors die with it); leave a shared cluster alone."""
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False
