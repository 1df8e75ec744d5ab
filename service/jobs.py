"""The job runner: a scheduler thread that runs each queued task in its own child process."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from entity.task import TaskKind, TaskRow, TaskStatus
from service import models
from service.backends import Room, TaskBackend, TaskHandle, make_backend
from service.db import STORE_ERRORS, is_disk_full, store_error_text
from service.tasks import TaskStore
from service.train.checkpoints import latest_checkpoint
from service.worker import DISK_FULL_EXIT, SETTINGS_ENV
from util.errors import ConflictError
from util.settings import PROJECT_ROOT, Settings, is_secret_env

log = logging.getLogger(__name__)

RESTART_ERROR = "interrupted by server restart"
SHUTDOWN_ERROR = "interrupted by server shutdown"
LOG_TAIL_CHARS = 4000
PURGE_EVERY_SECONDS = 3600  # how often the scheduler applies jobs.retention_days
HEARTBEAT_SECONDS = 5.0  # how often a scheduler marks itself alive in the store
STALE_SCHEDULER_SECONDS = 60.0  # a scheduler unseen this long (on another host) is taken for gone


@dataclass
class RunningJob:
    """A child process the runner started or adopted."""

    task_id: str
    pid: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    slots: int = 1
    started: float | None = None  # an adopted worker's process start time: a later process with its pid is not it
    handle: TaskHandle | None = None  # a worker on another backend (jobs.backend: ray); pid is then 0

    def end_reason(self) -> str | None:
        """Why the process ended, or None while it runs."""
        if self.handle is not None:
            return self.handle.end_reason()
        if self.proc is None:  # adopted after a restart: not our child, so no exit status
            alive = pid_alive(self.pid) and (self.started is None or process_start(self.pid) == self.started)
            return None if alive else "worker process ended (exit status unknown after a server restart)"
        code = self.proc.poll()
        return None if code is None else describe_exit(code)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(") ")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


WORKER_MODULES = {"--task-id": "service.worker", "--run-id": "service.run_worker"}
START_SLACK_SECONDS = 1.0  # clock granularity between the store's timestamp and the kernel's process start time


def process_start(pid: int) -> float | None:
    """A process's start time (seconds since the epoch), or None when it is gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def is_worker_of(pid: int, ident: str, not_before: datetime | None = None, flag: str = "--task-id") -> bool:
    """Whether `pid` is the live worker of task (or run) `ident`, by identity rather than by pid alone.

    Its command line must end in `-m <worker module> <flag> <ident>` (a reused pid, or a process that merely
    mentions the id, such as `tail` on its log, does not), and it must have started no earlier than
    `not_before` (when the task was claimed): a process older than the task cannot be its worker.
    """
    import psutil

    if not pid_alive(pid):
        return False
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        started = proc.create_time()
    except (psutil.Error, OSError):
        return False
    if argv[-4:] != ["-m", WORKER_MODULES[flag], flag, ident]:
        return False
    if not_before is not None:
        when = not_before if not_before.tzinfo else not_before.replace(tzinfo=UTC)  # SQLite drops the zone
        if started < when.timestamp() - START_SLACK_SECONDS:
            return False
    return True


def scheduler_owner(settings: Settings) -> str:
    """The owner name of the tasks and runs a server starts: jobs.scheduler_id, else the host name.

    The default survives a restart on another port (the restarted server adopts its tasks, as before owners
    existed); servers sharing a store from one host must each set their own jobs.scheduler_id.
    """
    return settings.jobs.scheduler_id or socket.gethostname()


def default_slots() -> int:
    """One job per GPU, or one on CPU."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - torch missing or broken means CPU
        return 1


def task_processes(task: TaskRow) -> int:
    """How many processes a task runs (a distributed training task runs one per GPU)."""
    return int((task.request.get("resolved") or {}).get("num_processes") or 1)


def worker_args(task: TaskRow) -> list[str]:
    """The `python -m` arguments of a task's worker (torchrun with one process per GPU when it is distributed)."""
    args = ["service.worker", "--task-id", task.id]
    processes = task_processes(task)
    if processes > 1:
        args = ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", *args]
    return args


def task_slots(task: TaskRow, slots: int) -> int:
    """Job slots a task takes: one per GPU it uses on a GPU server, one on CPU."""
    return min(slots, task_processes(task)) if models.gpu_count() else 1


def describe_exit(code: int) -> str:
    """A readable reason for a child's exit code."""
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (possibly killed for running out of memory)" if sig == signal.SIGKILL else ""
        return f"worker process was killed by signal {name}{hint}"
    if code == DISK_FULL_EXIT:
        return "disk full: the worker could not record the task's outcome (no space left for the task store)"
    return f"worker process exited with code {code}"


def read_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file, or '' if absent."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class JobRunner:
    """Starts queued tasks while slots are free, watches children, and cancels them."""

    def __init__(self, settings: Settings, store: TaskStore) -> None:
        """Bind to settings and the task store; call start() to begin scheduling."""
        self.settings = settings
        self.store = store
        self.slots = settings.jobs.max_concurrent_jobs or default_slots()
        self.log_dir = settings.logs_dir
        # Who claims tasks: servers sharing one store each run (and adopt, and kill) only the tasks they claimed.
        self.owner = scheduler_owner(settings)
        self._running: dict[str, RunningJob] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        backend = settings.jobs.backend
        self.backend: TaskBackend | None = None if backend == "local" else make_backend(backend, settings)
        self._seen = 0.0  # when the scheduler last refreshed its heartbeat (monotonic)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Claim this scheduler's name, recover tasks left by a previous server and start the scheduler thread."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.store.register_scheduler(
            self.owner, socket.gethostname(), os.getpid(), STALE_SCHEDULER_SECONDS, alive=pid_alive
        )
        self._seen = time.monotonic()
        self.store.reserve.ensure()  # spare space beside a SQLite store, for outcomes on a full disk
        if self.backend is not None:
            self.backend.connect()
        self.recover()
        self.purge_expired()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling and end every running child (marking its task failed)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            jobs = list(self._running.values())
        for job in jobs:
            # Mark first, so the worker's own report of the SIGTERM does not win the race.
            self.interrupted(self.store.get(job.task_id), SHUTDOWN_ERROR)
            self._kill(job)
        with self._lock:
            self._running.clear()
        if self.backend is not None:
            self.backend.close()
        if self._thread is not None:
            self.store.unregister_scheduler(self.owner, os.getpid())

    def purge_expired(self, now: float | None = None) -> int:
        """Apply jobs.retention_days: drop events of tasks finished before then, and log files untouched since.

        Task rows (status, metrics, error) stay. Returns how many log files were deleted.
        """
        days = self.settings.jobs.retention_days
        if days is None:
            return 0
        now = time.time() if now is None else now
        cutoff = now - days * 86400
        self.store.purge_events(datetime.fromtimestamp(cutoff, UTC))
        with self._lock:
            busy = {self.log_path(task_id) for task_id in self._running}
        removed = 0
        for path in self.log_dir.glob("*.log"):  # task logs and run-<id>.log of /v1/runs workers
            try:
                if path not in busy and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("retention: deleted %d log file(s) older than %g day(s)", removed, days)
        return removed

    def recover(self) -> None:
        """Adopt live workers of this scheduler's running tasks; fail those whose process is gone.

        Tasks another scheduler (another server on the same store) claimed are left to it. A cancel another
        server recorded while this one was down is carried out now: a still-live worker of it is killed.
        """
        for task in self.store.owned_cancel_requests(self.owner):
            if task.pid and is_worker_of(task.pid, task.id, task.started_at):
                log.info("carrying out the cancel of task %s sent while this server was down", task.id)
                self._kill(RunningJob(task.id, task.pid, self.log_path(task.id)))
            self.store.cancel_requests([task.id])
        for task in self.store.with_status(TaskStatus.running):
            if task.owner not in (None, self.owner):
                continue
            handle = self.backend.adopt(task, self.log_path(task.id)) if self.backend is not None else None
            if handle is not None:  # a Ray actor outlives the server when the cluster is not the server's own
                cost = self.task_cost(task)
                self._running[task.id] = RunningJob(task.id, 0, self.log_path(task.id), slots=cost, handle=handle)
                continue
            if task.pid and is_worker_of(task.pid, task.id, task.started_at):
                log.info("adopting live worker pid=%s of task %s", task.pid, task.id)
                cost = task_slots(task, self.slots)
                started = process_start(task.pid)
                self._running[task.id] = RunningJob(task.id, task.pid, self.log_path(task.id), None, cost, started)
                continue
            self.interrupted(task, RESTART_ERROR)

    def interrupted(self, task: TaskRow, reason: str) -> None:
        """A running task lost its worker to a restart or shutdown: re-queue a train task to resume, else fail it.

        A train task resumes from its newest checkpoint, at most train.max_resumes times; without a checkpoint,
        or past that count, it fails with `reason`.
        """
        limit = self.settings.train.max_resumes
        resolved = task.request.get("resolved") or {}
        is_train = task.kind == TaskKind.train and task.output_dir
        checkpoint = latest_checkpoint(Path(task.output_dir or "")) if is_train else None
        count = int(resolved.get("resume_count") or 0)
        if checkpoint is not None and count < limit:
            # The explicit checkpoint of the original request is spent: the resume takes the newest one.
            resolved = {**resolved, "resume_count": count + 1, "resume_from_checkpoint": None}
            message = f"{reason}; re-queued to resume from {checkpoint.name} (resume {count + 1} of {limit})"
            request = {**task.request, "resolved": resolved}
            if self.store.move(task.id, TaskStatus.queued, (TaskStatus.running,), message, request=request, pid=None):
                self._wake.set()
                return
        if checkpoint is not None and limit:
            reason = f"{reason}; gave up after {count} resumes (train.max_resumes is {limit})"
        self.store.move(task.id, TaskStatus.failed, (TaskStatus.running,), reason, error=reason)

    # -- public API ------------------------------------------------------------------------
    def submit(
        self, kind: TaskKind, request: dict, output_dir: str | None = None, task_id: str | None = None
    ) -> TaskRow:
        """Queue a task and wake the scheduler (409 for a busy output folder, 429 when the queue is full)."""
        jobs = self.settings.jobs
        task = self.store.create(kind, request, output_dir, task_id, jobs.max_queued, jobs.retry_after_seconds)
        self.store.add_event(task.id, "status", "queued", {"status": "queued"})
        self._wake.set()
        return task

    def cancel(self, task_id: str) -> TaskRow:
        """Cancel a queued or running task; a finished one raises ConflictError."""
        task = self.store.get(task_id)
        if task.status == TaskStatus.queued:
            if self.store.move(task_id, TaskStatus.cancelled, (TaskStatus.queued,)):
                return self.store.get(task_id)
            task = self.store.get(task_id)
        if task.status == TaskStatus.running and task.owner not in (None, self.owner):
            # Another server's scheduler runs it: mark it cancelled and flag it; that scheduler kills the worker.
            if self.store.request_cancel(task_id):
                return self.store.get(task_id)
            task = self.store.get(task_id)
        elif task.status == TaskStatus.running:
            with self._lock:
                # Mark first so the reaper does not report the kill as a crash.
                moved = self.store.move(task_id, TaskStatus.cancelled, (TaskStatus.running,))
                job = self._running.pop(task_id, None)
            if job is not None:
                self._kill(job)
            elif task.pid and is_worker_of(task.pid, task_id, task.started_at):
                self._kill(RunningJob(task_id, task.pid, self.log_path(task_id)))
            elif self.backend is not None:  # a Ray task this runner does not track: find its actor by name
                self.backend.kill_orphan(task, self.settings.jobs.cancel_grace_seconds)
            if moved:
                self._wake.set()
                return self.store.get(task_id)
            task = self.store.get(task_id)
        raise ConflictError(
            f"Task '{task_id}' is already {task.status}; only queued or running tasks can be cancelled.",
            details={"task_id": task_id, "status": task.status},
        )

    def signal_worker(self, task_id: str, signum: int) -> bool:
        """Signal the worker of a task running on a backend (Ray); False when this runner has no such worker."""
        with self._lock:
            job = self._running.get(task_id)
        return job is not None and job.handle is not None and job.handle.signal(signum)

    def log_path(self, task_id: str) -> Path:
        """Where a task's child writes its stdout and stderr."""
        return self.log_dir / f"{task_id}.log"

    # -- scheduler -------------------------------------------------------------------------
    def _loop(self) -> None:
        """Reap finished children and start queued tasks until stopped."""
        last_purge = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
                if time.monotonic() - last_purge > PURGE_EVERY_SECONDS:
                    last_purge = time.monotonic()
                    self.purge_expired()
            except STORE_ERRORS as exc:  # an outage or a full disk: one line per pass, not a traceback
                why = "disk full" if is_disk_full(exc) else "task store unavailable"
                if why == "disk full":
                    self.store.note_disk_full()
                log.warning("scheduler pass skipped: %s (%s)", why, store_error_text(exc))
            except Exception:
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.jobs.poll_interval)
            self._wake.clear()

    def tick(self) -> None:
        """One scheduling pass: reap, carry out cancels sent to other servers, then claim tasks for free slots."""
        if self._thread is not None and time.monotonic() - self._seen > HEARTBEAT_SECONDS:
            self._seen = time.monotonic()
            self.store.scheduler_seen(self.owner, os.getpid())
            self.store.reserve.ensure()  # back once the disk has room again (a full disk's writer used it)
        self._reap()
        self._carry_out_cancels()
        while not self._stop.is_set():
            with self._lock:
                free = self.capacity() - sum(job.slots for job in self._running.values())
                # First come, first served: a 2-GPU task waits for 2 free GPUs, nothing jumps ahead of it.
                task = self.store.claim_next(self.owner, lambda t, free=free: self.task_cost(t) <= free)
                if task is None:
                    return
                self._spawn(task, self.task_cost(task))

    def _carry_out_cancels(self) -> None:
        """Kill the workers of our tasks that a cancel sent to another server marked (tasks.cancel_requested)."""
        with self._lock:
            ids = list(self._running)
        for task_id in self.store.cancel_requests(ids):
            with self._lock:
                job = self._running.pop(task_id, None)
            if job is not None:
                log.info("cancel of task %s requested through another server; killing pid %s", task_id, job.pid)
                self._kill(job)

    def _reap(self) -> None:
        """Record the end of every child that has exited."""

        def record(job: RunningJob, reason: str, error: str) -> None:
            # Only changes anything if the child died without recording its own outcome.
            if reason == describe_exit(DISK_FULL_EXIT):
                self.store.note_disk_full()
            self.store.move(job.task_id, TaskStatus.failed, (TaskStatus.running,), reason, error=error)

        record_ended(self._running, self._lock, record)

    def capacity(self) -> int:
        """Job slots: jobs.max_concurrent_jobs, else the backend's (Ray: the cluster's GPUs or CPUs), else local."""
        if self.backend is not None and not self.settings.jobs.max_concurrent_jobs:
            return self.backend.capacity()
        return self.slots

    def room(self) -> Room:
        """The most one task may use: this host's GPUs and cores, or on Ray the largest live node's."""
        if self.backend is not None:
            return self.backend.room()
        return Room(models.gpu_count(), usable_cores(), "this server")

    def task_cost(self, task: TaskRow) -> int:
        """Job slots a task takes."""
        if self.backend is not None:
            return min(self.backend.cost(task), self.capacity())
        return task_slots(task, self.slots)

    def _spawn(self, task: TaskRow, cost: int = 1) -> None:
        """Start a child process for a task this scheduler claimed (torchrun, one process per GPU, if distributed)."""
        if self.backend is not None:
            self._start_on_backend(task, cost)
            return
        log_path = self.log_path(task.id)
        args = worker_args(task)
        with self._lock:
            # Claimed in tick under the same lock, so a concurrent cancel on this server cannot slip between.
            try:
                proc = spawn_worker(self.settings, args, log_path)
            except OSError as exc:
                self.store.transition(
                    task.id, TaskStatus.failed, (TaskStatus.running,), error=f"could not start worker: {exc}"
                )
                return
            self._running[task.id] = RunningJob(task.id, proc.pid, log_path, proc, slots=cost)
            self.store.set_pid(task.id, proc.pid)
        self.store.add_event(task.id, "status", "running", {"status": "running", "pid": proc.pid})
        log.info("started task %s (%s) as pid %s", task.id, task.kind, proc.pid)

    def _start_on_backend(self, task: TaskRow, cost: int) -> None:
        """Start the worker of a task this scheduler claimed on the configured backend (a Ray actor)."""
        log_path = self.log_path(task.id)
        assert self.backend is not None
        with self._lock:  # claimed in tick under the same lock, so a concurrent cancel cannot slip between
            try:
                handle = self.backend.start(task, log_path)
            except Exception as exc:  # noqa: BLE001 - any backend failure fails this task, not the scheduler
                error = f"could not start worker on the {self.settings.jobs.backend} backend: {exc}"
                self.store.transition(task.id, TaskStatus.failed, (TaskStatus.running,), error=error)
                return
            self._running[task.id] = RunningJob(task.id, 0, log_path, slots=cost, handle=handle)
        self.store.add_event(task.id, "status", "running", {"status": "running", **handle.describe()})
        log.info("started task %s (%s) on %s", task.id, task.kind, handle.describe())

    def _kill(self, job: RunningJob) -> None:
        """Terminate a child's whole process group: SIGTERM, then SIGKILL after the grace period."""
        if job.handle is not None:
            job.handle.kill(self.settings.jobs.cancel_grace_seconds)
            return
        terminate_group(job.pid, job.proc, self.settings.jobs.cancel_grace_seconds)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not just the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def take_ended(
    running: dict[str, RunningJob], lock: threading.RLock, tail_chars: int = LOG_TAIL_CHARS
) -> list[tuple[RunningJob, str, str]]:
    """Remove the workers that have exited; each with why it ended and that plus the tail of its log."""
    with lock:
        jobs = list(running.values())
    ended = []
    for job in jobs:
        reason = job.end_reason()
        if reason is None:
            continue
        with lock:
            running.pop(job.task_id, None)
        tail = read_tail(job.log_path, tail_chars)
        ended.append((job, reason, f"{reason}\n{tail}".strip()))
    return ended


def record_ended(
    running: dict[str, RunningJob],
    lock: threading.RLock,
    record: Callable[[RunningJob, str, str], None],
    tail_chars: int = LOG_TAIL_CHARS,
) -> None:
    """Record each exited worker through `record`; one the store cannot take now stays for the next pass."""
    for job, reason, error in take_ended(running, lock, tail_chars):
        try:
            record(job, reason, error)
        except STORE_ERRORS as exc:
            with lock:
                running.setdefault(job.task_id, job)
            why = "disk full" if is_disk_full(exc) else "task store unavailable"
            log.warning("%s; the end of %s is recorded later (%s)", why, job.task_id, store_error_text(exc))


def worker_environment() -> dict[str, str]:
    """The server's environment without its API keys: a worker never needs them (and never receives them)."""
    return {name: value for name, value in os.environ.items() if not is_secret_env(name)}


def nice_prefix(nice: int) -> list[str]:
    """`nice -n N` before a worker's command on a machine without a CUDA GPU, so the server stays responsive.

    The process starts nicer, so every thread it ever has (torch's pool starts at import) inherits the niceness.
    """
    if nice <= 0 or models.gpu_count():
        return []
    return ["nice", "-n", str(nice)]


def spawn_worker(
    settings: Settings, module_args: list[str], log_path: Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Start `python -m <module> <args>` in its own process group (without the API keys), output to log_path."""
    env = {
        **worker_environment(),
        SETTINGS_ENV: settings.model_dump_json(exclude={"auth"}),  # workers need no keys
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # NVLink multicast stays off: on shared multi-GPU hosts it can take every GPU out of service.
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a link planted at a queued task's log name is never written through.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "ab") as out:
        return subprocess.Popen(
            [*nice_prefix(settings.jobs.worker_nice), sys.executable, "-m", *module_args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so cancel can kill all of it
            preexec_fn=preexec_fn,
        )


def terminate_group(pid: int, proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM a worker's process group and every descendant, then SIGKILL what is left after `grace` seconds.

    Descendants are found by walking the process tree, because torchrun starts each rank in a session of its own.
    """
    import psutil

    try:
        pgid = os.getpgid(pid)
        tree = psutil.Process(pid).children(recursive=True)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    # Never signal our own group (an adopted process may share it); kill just that pid then.
    own_group = pgid == os.getpgrp()

    def signal_all(sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig) if own_group else os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for child in tree:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        root_done = (proc.poll() is not None) if proc else not pid_alive(pid)
        if root_done and not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in tree):
            break
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)
