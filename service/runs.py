"""Low-level training runs: the durable run/job/checkpoint store and the server-side run service.

A run is a worker process (service.run_worker) that keeps a base model, a LoRA adapter and its AdamW
state in memory. Primitive calls become jobs in SQLite; the worker executes its run's jobs in order.
"""

import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from entity.runs import (
    LIVE_RUN_STATUSES,
    CheckpointRow,
    CreateRunRequest,
    ForwardBackwardRequest,
    JobStatus,
    LoadStateRequest,
    OptimStepRequest,
    RunJobRow,
    RunRow,
    RunStatus,
    SampleRequest,
    SaveStateRequest,
    TokenExample,
)
from entity.task import utcnow
from service import models
from service.jobs import (
    RunningJob,
    is_worker_of,
    process_start,
    record_ended,
    scheduler_owner,
    spawn_worker,
    terminate_group,
)
from service.tasks import TaskStore, lock_for_write
from util.errors import ConflictError, InvalidInputError, NotFoundError, OverloadedError
from util.files import check_replaceable, read_json, read_marker, write_marker
from util.paths import resolve_in_roots
from util.settings import Settings

log = logging.getLogger(__name__)

RESTART_ERROR = "interrupted by server restart (the run's memory state was lost; saved states remain)"
TERMINAL_JOB = (JobStatus.completed, JobStatus.failed)


class TooManyRunsError(OverloadedError):
    """The configured limit of live runs is reached (429 with Retry-After)."""

    error_type = "too_many_runs"


class RunStore:
    """CRUD and atomic transitions for runs, their jobs and checkpoints (same SQLite file as tasks)."""

    def __init__(self, engine: Engine) -> None:
        """Use an engine created in this process (make_engine)."""
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s, s.begin():
            yield s

    # -- runs -------------------------------------------------------------------------------------------
    def add_run(self, row: RunRow, max_live: int | None = None, retry_after: int = 30) -> RunRow:
        """Insert a run; with `max_live`, count the live runs and insert in one write transaction (429 when full)."""
        with self.session() as s:
            if max_live is not None:
                lock_for_write(s)
                _check_live(s, max_live, retry_after)
            s.add(row)
        return row

    def resume_run(self, run_id: str, max_live: int, retry_after: int = 30) -> bool:
        """Move a paused run to starting if fewer than `max_live` runs are live (429 otherwise), atomically."""
        with self.session() as s:
            lock_for_write(s)
            _check_live(s, max_live, retry_after)
            stmt = update(RunRow).where(RunRow.id == run_id, RunRow.status == RunStatus.paused)
            return s.execute(stmt.values(status=RunStatus.starting)).rowcount == 1

    def get_run(self, run_id: str) -> RunRow:
        """A run, or NotFoundError."""
        with self.session() as s:
            row = s.get(RunRow, run_id)
        if row is None:
            raise NotFoundError(f"Run '{run_id}' does not exist.", details={"run_id": run_id})
        return row

    def runs(self, statuses: tuple[str, ...] | None = None) -> list[RunRow]:
        """Runs, newest first, optionally only in some statuses."""
        query = select(RunRow).order_by(RunRow.created_at.desc())
        if statuses:
            query = query.where(RunRow.status.in_([str(s) for s in statuses]))
        with self.session() as s:
            return list(s.scalars(query))

    def count_live(self) -> int:
        """Runs whose worker is starting or ready."""
        query = select(func.count()).select_from(RunRow).where(RunRow.status.in_([str(s) for s in LIVE_RUN_STATUSES]))
        with self.session() as s:
            return int(s.scalar(query) or 0)

    def move_run(self, run_id: str, to: RunStatus, allowed_from: tuple[RunStatus, ...], **fields: Any) -> bool:
        """Atomically change a run's status if it is in `allowed_from`."""
        stmt = (
            update(RunRow)
            .where(RunRow.id == run_id, RunRow.status.in_([str(s) for s in allowed_from]))
            .values(status=to, **fields)
        )
        with self.session() as s:
            return s.execute(stmt).rowcount == 1

    def set_run(self, run_id: str, **fields: Any) -> None:
        """Update fields of a run."""
        with self.session() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(**fields))

    def take_gradients(self, run_id: str) -> bool:
        """Consume the run's pending gradients for an optim_step; False when there are none."""
        stmt = update(RunRow).where(RunRow.id == run_id, RunRow.pending_grads > 0).values(pending_grads=0)
        with self.session() as s:
            return s.execute(stmt).rowcount == 1

    # -- jobs -------------------------------------------------------------------------------------------
    def add_job(self, run_id: str, kind: str, request: dict[str, Any], grads: bool = False) -> RunJobRow:
        """Queue a job (and count a forward_backward's gradients) in one transaction."""
        row = RunJobRow(id=uuid.uuid4().hex, run_id=run_id, kind=kind, status=JobStatus.queued, request=request)
        with self.session() as s:
            s.add(row)
            values: dict[str, Any] = {"last_used_at": utcnow()}
            if grads:
                values["pending_grads"] = RunRow.pending_grads + 1
            s.execute(update(RunRow).where(RunRow.id == run_id).values(**values))
        return row

    def get_job(self, job_id: str) -> RunJobRow:
        """A job, or NotFoundError."""
        with self.session() as s:
            row = s.scalar(select(RunJobRow).where(RunJobRow.id == job_id))
        if row is None:
            raise NotFoundError(f"Job '{job_id}' does not exist.", details={"job_id": job_id})
        return row

    def claim_batch(
        self, run_id: str, batchable: frozenset[str], limit: int, only_batchable: bool = False
    ) -> list[RunJobRow]:
        """The run's oldest queued job, plus the `batchable` jobs queued right behind it, all moved to running.

        Only when the oldest job is itself batchable does the batch grow, and it stops at the first job of another
        kind, so jobs still execute in queue order. With `only_batchable` (extending a batch already claimed), an
        oldest job of another kind is left queued. One write transaction: a concurrent cancel cannot slip between.
        """
        with self.session() as s:
            lock_for_write(s)
            query = (
                select(RunJobRow)
                .where(RunJobRow.run_id == run_id, RunJobRow.status == JobStatus.queued)
                .order_by(RunJobRow.seq)
                .limit(limit)
            )
            rows: list[RunJobRow] = []
            for row in s.scalars(query):
                if (rows or only_batchable) and (row.kind not in batchable or (rows and rows[0].kind not in batchable)):
                    break
                rows.append(row)
            if rows:
                s.execute(
                    update(RunJobRow)
                    .where(RunJobRow.seq.in_([r.seq for r in rows]))
                    .values(status=JobStatus.running, started_at=utcnow())
                )
        return rows

    def cancel_job(self, job_id: str, reason: str) -> RunJobRow:
        """Fail a queued job with `reason` (taking back a forward_backward's pending gradients); 409 once it started."""
        with self.session() as s:
            lock_for_write(s)
            row = s.scalar(select(RunJobRow).where(RunJobRow.id == job_id))
            if row is None:
                raise NotFoundError(f"Job '{job_id}' does not exist.", details={"job_id": job_id})
            if row.status != JobStatus.queued:
                raise ConflictError(
                    f"Job '{job_id}' is {row.status}: only a queued job can be cancelled "
                    "(a running job is not interrupted; a finished one keeps its result).",
                    details={"job_id": job_id, "status": str(row.status)},
                )
            s.execute(
                update(RunJobRow)
                .where(RunJobRow.seq == row.seq)
                .values(status=JobStatus.failed, error=reason, finished_at=utcnow())
            )
            if _makes_gradients(row):
                pending = RunRow.pending_grads
                s.execute(update(RunRow).where(RunRow.id == row.run_id, pending > 0).values(pending_grads=pending - 1))
        return self.get_job(job_id)

    def tagged_jobs(self, kind: str, tag: str, after_seq: int, limit: int = 1000) -> list[RunJobRow]:
        """Jobs of `kind` whose request carries this "tag", queued after `after_seq`, oldest first (any run)."""
        query = (
            select(RunJobRow)
            .where(RunJobRow.kind == kind, RunJobRow.seq > after_seq, RunJobRow.request["tag"].as_string() == tag)
            .order_by(RunJobRow.seq)
            .limit(limit)
        )
        with self.session() as s:
            return list(s.scalars(query))

    def finish_job(self, job_id: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Record a job's result (completed) or error (failed)."""
        status = JobStatus.failed if error is not None else JobStatus.completed
        with self.session() as s:
            s.execute(
                update(RunJobRow)
                .where(RunJobRow.id == job_id)
                .values(status=status, result=result, error=error, finished_at=utcnow())
            )

    def fail_unfinished(self, run_id: str, reason: str) -> None:
        """Fail every queued or running job of a run."""
        with self.session() as s:
            s.execute(
                update(RunJobRow)
                .where(RunJobRow.run_id == run_id, RunJobRow.status.in_([JobStatus.queued, JobStatus.running]))
                .values(status=JobStatus.failed, error=reason, finished_at=utcnow())
            )

    def has_unfinished(self, run_id: str) -> bool:
        """Whether the run has queued or running jobs."""
        query = (
            select(func.count())
            .select_from(RunJobRow)
            .where(RunJobRow.run_id == run_id, RunJobRow.status.in_([JobStatus.queued, JobStatus.running]))
        )
        with self.session() as s:
            return bool(s.scalar(query))

    # -- checkpoints ------------------------------------------------------------------------------------
    def add_checkpoint(self, run_id: str, name: str, path: str, step: int) -> None:
        """Record a saved state (replacing a same-named one of the run)."""
        with self.session() as s:
            old = s.scalars(select(CheckpointRow).where(CheckpointRow.run_id == run_id, CheckpointRow.name == name))
            for row in old:
                s.delete(row)
            s.add(CheckpointRow(run_id=run_id, name=name, path=path, step=step, created_at=utcnow()))

    def delete_checkpoint(self, run_id: str, name: str) -> bool:
        """Forget a saved state's row; False when there is none."""
        with self.session() as s:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id, CheckpointRow.name == name)
            rows = list(s.scalars(query))
            for row in rows:
                s.delete(row)
        return bool(rows)

    def checkpoints(self, run_id: str | None = None) -> list[CheckpointRow]:
        """Saved states, newest first."""
        query = select(CheckpointRow).order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
        if run_id:
            query = query.where(CheckpointRow.run_id == run_id)
        with self.session() as s:
            return list(s.scalars(query))


RUN_STATE_KIND = "run_state"
CANCELLED = "cancelled"  # the error of a job cancelled while queued


def _makes_gradients(job: RunJobRow) -> bool:
    """Whether a job was counted in its run's pending gradients when queued."""
    if job.kind == "forward_backward":
        return True
    return job.kind == "loss_step" and not (job.request or {}).get("forward_only")


def _check_live(session: Session, limit: int, retry_after: int) -> None:
    """429 with Retry-After when `limit` runs are already live (call inside a write-locked session)."""
    query = select(func.count()).select_from(RunRow).where(RunRow.status.in_([str(s) for s in LIVE_RUN_STATUSES]))
    if int(session.scalar(query) or 0) >= limit:
        raise TooManyRunsError(
            f"{limit} runs are already live (runs.max_runs); delete one or wait for an idle one to pause.",
            retry_after=retry_after,
            details={"max_runs": limit},
        )


def checkpoint_dir(settings: Settings, run_id: str, name: str) -> Path:
    """Where a run's named state is saved (inside the model dir, so it can be served and exported)."""
    return settings.model_dir / "runs" / run_id / name


def adopt_legacy_state(path: Path, run_id: str) -> None:
    """Mark a state this run saved before outputs carried markers (its run_state.json names the run)."""
    if not path.is_dir() or read_marker(path) is not None:
        return
    try:
        meta = read_json(path / "run_state.json")
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and meta.get("run_id") == run_id:
        write_marker(path, RUN_STATE_KIND, run_id, legacy=True)


def read_state(path: Path) -> dict[str, Any]:
    """Check a saved state folder and return its adapter config."""
    if not models.is_adapter_dir(path):
        raise InvalidInputError(f"'{path.name}' is not a saved run state (it has no adapter_config.json).")
    try:
        cfg = read_json(path / "adapter_config.json")
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"'{path.name}' has an unreadable adapter_config.json.")
    return cfg


class RunService:
    """Creates, feeds, watches and frees runs; the server's half of the low-level training API."""

    def __init__(self, settings: Settings, tasks: TaskStore) -> None:
        """Share the task store's engine; call start() to recover runs and watch workers."""
        self.settings = settings
        self.store = RunStore(tasks.engine)
        self.log_dir = settings.logs_dir
        self.owner = scheduler_owner(settings)  # servers sharing a store each watch only the workers they started
        self._workers: dict[str, RunningJob] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Adopt live workers, fail runs whose worker is gone, and start the watcher thread.

        Runs another server (on the same store) started are its own to adopt or fail.
        """
        for run in self.store.runs(LIVE_RUN_STATUSES):
            if run.owner not in (None, self.owner):
                continue
            if run.pid and is_worker_of(run.pid, run.id, run.created_at, flag="--run-id"):
                self._workers[run.id] = RunningJob(run.id, run.pid, self._log(run.id), started=process_start(run.pid))
                continue
            self._fail(run.id, RESTART_ERROR)
        self._thread = threading.Thread(target=self._watch, name="run-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every worker; each saves its state and pauses, to resume on its next call."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            terminate_group(worker.pid, worker.proc, grace=30)

    def _watch(self) -> None:
        """Notice workers that died without recording why."""
        while not self._stop.wait(0.5):
            try:
                record_ended(
                    self._workers, self._lock, lambda w, _, error: self._fail(w.task_id, error, only_live=True), 2000
                )
            except Exception:  # the watcher must outlive any one pass
                log.exception("run watcher pass failed")

    def _fail(self, run_id: str, reason: str, only_live: bool = False) -> None:
        """Mark a run failed (freeing its slot) and fail its unfinished jobs."""
        allowed = LIVE_RUN_STATUSES if only_live else (*LIVE_RUN_STATUSES, RunStatus.paused)
        if self.store.move_run(run_id, RunStatus.failed, allowed, error=reason, pid=None):
            self.store.fail_unfinished(run_id, f"run failed: {reason.splitlines()[0]}")

    def _log(self, run_id: str) -> Path:
        """A run worker's log file."""
        return self.log_dir / f"run-{run_id}.log"

    def _spawn(self, run_id: str) -> None:
        """Start the worker process of a run."""
        proc = spawn_worker(self.settings, ["service.run_worker", "--run-id", run_id], self._log(run_id))
        with self._lock:
            self._workers[run_id] = RunningJob(run_id, proc.pid, self._log(run_id), proc)
        self.store.set_run(run_id, pid=proc.pid, owner=self.owner)

    # -- runs -------------------------------------------------------------------------------------------
    def create(self, req: CreateRunRequest, run_id: str | None = None) -> RunRow:
        """Start a run: a fresh LoRA on a base model, or one restored from a saved state.

        `run_id` lets a protocol front end (Tinker's model ids) name the run; by default it is a fresh uuid.
        """
        if run_id is not None and self._exists(run_id):
            raise ConflictError(f"Run '{run_id}' already exists.", details={"run_id": run_id})
        lora = req.lora.model_dump()
        resume_from = None
        if req.from_state:
            state = resolve_in_roots(req.from_state, self.settings.model_dir, self.settings)
            if not state.exists():
                raise NotFoundError(f"Saved state '{req.from_state}' does not exist.")
            read_state(state)
            # The saved adapter_config.json is a file a client can write: its base is checked like a client path.
            base_path = models.checked_adapter_base(state, self.settings)
            if not models.is_model_dir(base_path):
                raise NotFoundError(f"The base model of '{req.from_state}' is gone.")
            cfg = read_state(state)
            targets = cfg.get("target_modules")
            lora = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "target_modules": targets}
            base_name = base_path.name
            resume_from = str(state)
        else:
            base_path = models.resolve_model(req.base_model, self.settings)
            if models.is_adapter_dir(base_path):
                raise InvalidInputError(
                    f"'{req.base_model}' is a LoRA adapter; a run needs a full base model (or use from_state)."
                )
            base_name = req.base_model or self.settings.models.base_model
        config = read_json(base_path / "config.json")
        run = RunRow(
            id=run_id or uuid.uuid4().hex,
            status=RunStatus.starting,
            base_model=base_name,
            base_path=str(base_path),
            lora=lora,
            seed=req.seed,
            vocab_size=int(config.get("vocab_size") or 0),
            resume_from=resume_from,
            resume_optimizer=int(req.with_optimizer),
            created_at=utcnow(),
            last_used_at=utcnow(),
        )
        # The live-run count and the insert are one write transaction: concurrent creates cannot overshoot.
        self.store.add_run(run, self.settings.runs.max_runs, self.settings.jobs.retry_after_seconds)
        self._spawn(run.id)
        return self.store.get_run(run.id)

    def _exists(self, run_id: str) -> bool:
        """Whether a run with this id is stored."""
        try:
            self.store.get_run(run_id)
        except NotFoundError:
            return False
        return True

    def delete(self, run_id: str) -> RunRow:
        """Free a run: stop its worker and fail its pending jobs; its saved states stay."""
        run = self.store.get_run(run_id)
        if run.status == RunStatus.deleted:
            raise ConflictError(f"Run '{run_id}' is already deleted.")
        self.store.move_run(run_id, RunStatus.deleted, tuple(s for s in RunStatus if s != RunStatus.deleted), pid=None)
        self.store.fail_unfinished(run_id, "run deleted")
        with self._lock:
            worker = self._workers.pop(run_id, None)
        if worker is not None:
            terminate_group(worker.pid, worker.proc, self.settings.jobs.cancel_grace_seconds)
        return self.store.get_run(run_id)

    def _usable(self, run_id: str) -> RunRow:
        """A run that can take jobs, resuming a paused one; 404/409 otherwise."""
        run = self.store.get_run(run_id)
        if run.status == RunStatus.deleted:
            raise ConflictError(f"Run '{run_id}' was deleted; create a new run (from_state can restore a save).")
        if run.status == RunStatus.failed:
            raise ConflictError(
                f"Run '{run_id}' failed: {(run.error or '').splitlines()[0]}", details={"run_id": run_id}
            )
        if run.status == RunStatus.paused and self.store.resume_run(
            run_id, self.settings.runs.max_runs, self.settings.jobs.retry_after_seconds
        ):
            self._spawn(run_id)
        return run

    # -- jobs -------------------------------------------------------------------------------------------
    def forward_backward(self, run_id: str, req: ForwardBackwardRequest) -> RunJobRow:
        """Queue a forward/backward pass; token ids are checked against the vocabulary first."""
        run = self.store.get_run(run_id)
        for i, ex in enumerate(req.examples):
            if isinstance(ex, TokenExample):
                bad = [t for t in (*ex.input_ids, *ex.target_ids) if not 0 <= t < run.vocab_size]
                if bad:
                    raise InvalidInputError(
                        f"examples[{i}] has token ids outside the vocabulary [0, {run.vocab_size}): {bad[:5]}",
                        details={"example": i, "vocab_size": run.vocab_size},
                    )
        self._usable(run_id)
        return self.store.add_job(run_id, "forward_backward", req.model_dump(), grads=True)

    def optim_step(self, run_id: str, req: OptimStepRequest) -> RunJobRow:
        """Queue an AdamW step; 409 when no forward_backward has been queued since the last step."""
        self._usable(run_id)
        if not self.store.take_gradients(run_id):
            raise ConflictError(
                "There are no gradients to apply: call forward_backward before optim_step.",
                details={"run_id": run_id},
            )
        return self.store.add_job(run_id, "optim_step", req.model_dump())

    def submit(self, run_id: str, kind: str, request: dict[str, Any], grads: bool = False) -> RunJobRow:
        """Queue a job a protocol front end has already validated (resuming a paused run first)."""
        self._usable(run_id)
        return self.store.add_job(run_id, kind, request, grads=grads)

    def submit_optim_step(self, run_id: str, req: OptimStepRequest) -> RunJobRow:
        """Like optim_step, but a step with no queued gradients is a no-op job rather than a 409."""
        self._usable(run_id)
        self.store.take_gradients(run_id)
        return self.store.add_job(run_id, "optim_step", req.model_dump())

    def sample(self, run_id: str, req: SampleRequest) -> RunJobRow:
        """Queue sampling with the run's current weights."""
        self._usable(run_id)
        return self.store.add_job(run_id, "sample", req.model_dump())

    def save_state(self, run_id: str, req: SaveStateRequest) -> RunJobRow:
        """Queue saving the adapter and optimizer state under a name."""
        self._usable(run_id)
        target = checkpoint_dir(self.settings, run_id, req.name)
        adopt_legacy_state(target, run_id)
        if check_replaceable(target, RUN_STATE_KIND, req.name) and not req.overwrite:
            raise ConflictError(f"Run '{run_id}' already has a state named '{req.name}'; pass \"overwrite\": true.")
        return self.store.add_job(run_id, "save_state", {**req.model_dump(), "path": str(target)})

    def load_state(self, run_id: str, req: LoadStateRequest) -> RunJobRow:
        """Queue loading a saved state (same base and LoRA shape) into the run."""
        run = self.store.get_run(run_id)
        path = resolve_in_roots(req.path, self.settings.model_dir, self.settings)
        if not path.exists():
            raise NotFoundError(f"Saved state '{req.path}' does not exist.")
        cfg = read_state(path)
        if models.checked_adapter_base(path, self.settings) != Path(run.base_path).resolve():
            raise ConflictError(f"'{req.path}' was saved on another base model than this run's ({run.base_model}).")
        if cfg.get("r") != run.lora.get("r"):
            raise ConflictError(f"'{req.path}' has LoRA rank {cfg.get('r')}; this run's is {run.lora.get('r')}.")
        if req.with_optimizer and not (path / "optimizer.pt").is_file():
            raise InvalidInputError(f"'{req.path}' has no optimizer state; pass \"with_optimizer\": false.")
        self._usable(run_id)
        return self.store.add_job(run_id, "load_state", {"path": str(path), "with_optimizer": req.with_optimizer})

    async def wait_job(self, job_id: str, timeout: float) -> RunJobRow:
        """Long-poll a job until it completes or fails, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await asyncio.to_thread(self.store.get_job, job_id)
            if job.status in TERMINAL_JOB or loop.time() >= deadline:
                return job
            await asyncio.sleep(self.settings.runs.poll_interval * 2)
