"""Fine-tuning jobs: OpenAI's job protocol over the train task service (a job is a train task).

Hyperparameters left out or "auto" resolve from the number of training records n:
- n_epochs: 3 for up to 1,000 records, then round(3000 / n), never below 1;
- batch_size: the largest power of two up to n / 32, between 1 and 8;
- learning_rate_multiplier: 1.0, scaling the LoRA base rate (2e-4 supervised, 5e-5 DPO);
- beta (DPO): 0.1.
Every job trains a LoRA adapter (r=16, alpha=32, all linear layers) and saves a checkpoint each epoch.
"""

import math
import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any

from openai.types import Model, ModelDeleted
from openai.types.fine_tuning import FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from sqlalchemy import select, update

from entity.fine_tuning import FileRow, FineTuningJobOut, JobCreateRequest
from entity.task import EventRow, TaskKind, TaskRow, TaskStatus
from entity.train import LoraConfigIn, TrainConfig, TrainRequest
from service import models
from service.db import json_text
from service.fine_tuning.files import FileService
from service.jobs import JobRunner, is_worker_of, task_processes, terminate_group
from service.train import tracking
from service.train.pause import PAUSE_SIGNAL
from service.train.service import TrainService
from util.errors import BadRequestError, ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from util.files import remove_output

JOB_PREFIX = "ftjob-"
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
BASE_LEARNING_RATE = {"supervised": 2e-4, "dpo": 5e-5}
STRATEGY = {"supervised": "lora", "dpo": "dpo"}
KIND = {"supervised": "chat", "dpo": "preference"}
DEFAULT_BETA = 0.1


def auto_hyperparameters(n: int) -> dict[str, Any]:
    """The values "auto" stands for, for a training file of n records (the module docstring's rule)."""
    return {
        "n_epochs": max(1, min(3, round(3000 / max(n, 1)))),
        "batch_size": min(8, 2 ** int(math.log2(max(1, n // 32)))),
        "learning_rate_multiplier": 1.0,
    }


def job_id(task_id: str) -> str:
    """The OpenAI job id of a task."""
    return JOB_PREFIX + task_id


def _ts(value: datetime | None) -> int | None:
    """Unix seconds of a stored time."""
    return int(value.timestamp()) if value else None


def _level(level: str) -> str:
    """A store level as OpenAI's info | warn | error."""
    return {"warning": "warn", "warn": "warn", "error": "error"}.get(level, "info")


def metrics_data(event: EventRow) -> dict[str, Any]:
    """A metrics or eval event's record with OpenAI's metric names added (train_loss, valid_loss, ...)."""
    data = dict(event.data or {})
    renames = {
        "loss": "train_loss",
        "mean_token_accuracy": "train_mean_token_accuracy",
        "eval_loss": "valid_loss",
        "eval_mean_token_accuracy": "valid_mean_token_accuracy",
    }
    for ours, theirs in renames.items():
        if ours in data:
            data[theirs] = data[ours]
    return data


class FineTuningService:
    """Creates, lists, pauses and resumes jobs, and names and deletes their models."""

    def __init__(self, train: TrainService, runner: JobRunner, files: FileService) -> None:
        """Bind to the train service (jobs are its tasks), the runner, and the file store."""
        self.train = train
        self.runner = runner
        self.store = runner.store
        self.files = files
        self.settings = train.settings

    # -- create ----------------------------------------------------------------------------
    def _file(self, file_id: str, param: str, kind: str, method: str) -> FileRow:
        """A training or validation file the method can train on, or a 400 naming the parameter."""
        try:
            row = self.files.row(file_id)
        except NotFoundError:
            raise BadRequestError(f"{param} '{file_id}' does not exist.", param=param, code="invalid_file") from None
        if row.purpose != "fine-tune":
            raise BadRequestError(f"{param} '{file_id}' was not uploaded with purpose 'fine-tune'.", param=param)
        if row.kind != kind:
            hint = "method dpo" if row.kind == "preference" else "method supervised"
            raise BadRequestError(
                f"{param} '{file_id}' holds {row.kind} records, but method {method} trains on {kind} records; "
                f"use {hint} or another file.",
                param=param,
                code="invalid_file",
            )
        return row

    def _report_to(self, integrations: list[dict] | None) -> list[str] | None:
        """The trackers a job reports to: W&B integrations add wandb (offline mode) to the configured default."""
        if not integrations:
            return None
        kinds = [i.get("type") if isinstance(i, dict) else None for i in integrations]
        if any(k != "wandb" for k in kinds):
            raise BadRequestError(
                f"integrations of type {[k for k in kinds if k != 'wandb']} are not supported; only 'wandb' "
                "(metrics logged by wandb in offline mode into the job's output folder).",
                param="integrations",
            )
        names = [*tracking.trackers(None, self.train.settings.train.report_to), "wandb"]
        try:
            tracking.check_installed(names)
        except InvalidInputError as exc:
            raise BadRequestError(f"integrations: {exc.message}", param="integrations") from None
        return list(dict.fromkeys(names))

    def create(self, req: JobCreateRequest) -> FineTuningJobOut:
        """Check the request and files, resolve "auto", and queue the train task."""
        report_to = self._report_to(req.integrations)
        method = req.method.type if req.method else "supervised"
        if method == "reinforcement":
            raise BadRequestError(
                "method 'reinforcement' is not supported; use 'supervised' or 'dpo'.", param="method.type"
            )
        given = None
        if req.method is not None:
            for other in ("supervised", "dpo", "reinforcement"):
                if other != method and getattr(req.method, other) is not None:
                    raise BadRequestError(f"method.{other} is set but method.type is '{method}'.", param="method")
            block = getattr(req.method, method)
            given = block.hyperparameters if block is not None else None
        if req.hyperparameters is not None:
            if given is not None:
                raise BadRequestError(
                    f"Give hyperparameters in method.{method}.hyperparameters or at the top level, not both.",
                    param="hyperparameters",
                )
            given = req.hyperparameters
        train_file = self._file(req.training_file, "training_file", KIND[method], method)
        valid_file = None
        if req.validation_file:
            valid_file = self._file(req.validation_file, "validation_file", KIND[method], method)
        auto = auto_hyperparameters(train_file.records)
        chosen = {}
        for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            value = getattr(given, key, None) if given is not None else None
            chosen[key] = auto[key] if value in (None, "auto") else value
        beta = getattr(given, "beta", None) if given is not None else None
        if method == "dpo":
            chosen["beta"] = DEFAULT_BETA if beta in (None, "auto") else beta
        steps_per_epoch = max(1, math.ceil(train_file.records / chosen["batch_size"]))
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        match = models.FT_NAME.match(req.model)
        base = match["base"] if match else req.model
        config = TrainConfig(
            model_path=req.model,
            per_device_train_batch_size=chosen["batch_size"],
            learning_rate=BASE_LEARNING_RATE[method] * chosen["learning_rate_multiplier"],
            num_train_epochs=chosen["n_epochs"],
            save_steps=steps_per_epoch,
            seed=seed,
            eval_dataset_path=valid_file.path if valid_file else None,
            eval_steps=steps_per_epoch if valid_file else None,
            lora_config=LoraConfigIn(),
            beta=chosen.get("beta"),
            report_to=report_to,
        )
        train_req = TrainRequest(strategy=STRATEGY[method], dataset_path=train_file.path, config=config)
        meta = {
            "base": base,
            "model": req.model,
            "suffix": req.suffix,
            "training_file": train_file.id,
            "validation_file": valid_file.id if valid_file else None,
            "seed": seed,
            "metadata": req.metadata,
            "method": method,
            "hyperparameters": chosen,
        }
        task = self.train.start(train_req, extra={"openai": meta})
        return self.to_job(self.store.get(task.id))

    # -- read ------------------------------------------------------------------------------
    def task(self, job: str) -> TaskRow:
        """The train task behind a job id, or NotFoundError."""
        task_id = job.removeprefix(JOB_PREFIX)
        try:
            task = self.store.get(task_id) if job.startswith(JOB_PREFIX) else None
        except NotFoundError:
            task = None
        if task is None or not (task.request or {}).get("openai"):
            raise NotFoundError(f"No such fine-tuning job: '{job}'.", details={"job": job})
        return task

    def get(self, job: str) -> FineTuningJobOut:
        """One job."""
        return self.to_job(self.task(job))

    def to_job(self, task: TaskRow) -> FineTuningJobOut:
        """A train task as OpenAI's FineTuningJob."""
        meta = task.request["openai"]
        hp = meta["hyperparameters"]
        status = task.status
        error = None
        if status == TaskStatus.failed:
            lines = (task.error or "training failed").strip().splitlines()
            error = {"code": "training_failed", "message": lines[0], "param": None}
        method: dict[str, Any] = {"type": meta["method"], meta["method"]: {"hyperparameters": hp}}
        done = status == TaskStatus.succeeded
        estimated = None
        if status == TaskStatus.running and task.eta_seconds is not None:
            estimated = int(datetime.now().timestamp() + task.eta_seconds)
        metrics = task.metrics or {}
        return FineTuningJobOut(
            id=job_id(task.id),
            object="fine_tuning.job",
            created_at=_ts(task.created_at) or 0,
            finished_at=_ts(task.finished_at) if status in ("succeeded", "failed", "cancelled") else None,
            error=error,
            fine_tuned_model=models.fine_tuned_name(task) if done else None,
            hyperparameters={k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            model=meta["model"],
            organization_id="org-win-train",
            result_files=[self.files.results_file(task, lambda: self._result_rows(task.id))] if done else [],
            seed=meta["seed"],
            status=status,  # type: ignore[arg-type]
            trained_tokens=metrics.get("num_input_tokens_seen") or None if done else None,
            training_file=meta["training_file"],
            validation_file=meta.get("validation_file"),
            estimated_finish=estimated,
            integrations=None,
            metadata=meta.get("metadata"),
            method=method,
            user_provided_suffix=meta.get("suffix"),
        )

    def _result_rows(self, task_id: str) -> list[dict[str, Any]]:
        """One row per logged step: its training metrics merged with the evaluation at that step."""
        rows: dict[int, dict[str, Any]] = {}
        for event in self.store.events(task_id, 0, 1_000_000):
            if event.type in ("metrics", "eval") and event.data:
                data = metrics_data(event)
                row = rows.setdefault(int(data.get("step") or 0), {"step": int(data.get("step") or 0)})
                if "train_mean_token_accuracy" in data:
                    data["train_accuracy"] = data["train_mean_token_accuracy"]
                skip = {"total_steps", "loss", "mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy"}
                row.update({k: v for k, v in data.items() if isinstance(v, (int, float)) and k not in skip})
        return [rows[k] for k in sorted(rows)]

    def page(
        self, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[FineTuningJobOut], bool]:
        """Jobs newest first, after the cursor job; and whether more follow."""
        engine = self.store.engine
        query = select(TaskRow).where(
            TaskRow.kind == TaskKind.train, json_text(engine, TaskRow.request, "openai").is_not(None)
        )
        for key, value in (metadata or {}).items():
            if '"' in key or "\\" in key:
                raise BadRequestError(f"metadata key {key!r} cannot be filtered on.", param="metadata")
            query = query.where(json_text(engine, TaskRow.request, "openai", "metadata", key) == value)
        if after:
            cursor = self.task(after)
            query = query.where(
                (TaskRow.created_at < cursor.created_at)
                | ((TaskRow.created_at == cursor.created_at) & (TaskRow.id < cursor.id))
            )
        query = query.order_by(TaskRow.created_at.desc(), TaskRow.id.desc()).limit(limit + 1)
        with self.store.session() as s:
            rows = list(s.scalars(query))
        return [self.to_job(t) for t in rows[:limit]], len(rows) > limit

    def events(self, job: str, after: str | None, limit: int) -> tuple[list[FineTuningJobEvent], bool]:
        """A job's events newest first, after the cursor event; and whether more follow."""
        task = self.task(job)
        query = select(EventRow).where(EventRow.task_id == task.id)
        if after:
            if not after.startswith(EVENT_PREFIX) or not after.removeprefix(EVENT_PREFIX).isdigit():
                raise BadRequestError(f"after '{after}' is not an event id of this job.", param="after")
            query = query.where(EventRow.id < int(after.removeprefix(EVENT_PREFIX)))
        query = query.order_by(EventRow.id.desc()).limit(limit + 1)
        with self.store.session() as s:
            rows = list(s.scalars(query))
        return [self._event(e) for e in rows[:limit]], len(rows) > limit

    @staticmethod
    def _event(event: EventRow) -> FineTuningJobEvent:
        """A task event as OpenAI's FineTuningJobEvent (metrics and eval records are type metrics)."""
        is_metrics = event.type in ("metrics", "eval")
        data = metrics_data(event) if is_metrics else event.data
        return FineTuningJobEvent(
            id=f"{EVENT_PREFIX}{event.id}",
            object="fine_tuning.job.event",
            created_at=_ts(event.created_at) or 0,
            level=_level(event.level),  # type: ignore[arg-type]
            message=event.message or event.type,
            type="metrics" if is_metrics else "message",
            data=data,
        )

    def checkpoints(self, job: str, after: str | None, limit: int) -> tuple[list[FineTuningJobCheckpoint], bool]:
        """A job's checkpoints still on disk, newest first, with the metrics logged at or before each."""
        task = self.task(job)
        name = models.fine_tuned_name(task)
        events = self.store.events(task.id, 0, 1_000_000)
        found: list[FineTuningJobCheckpoint] = []
        latest: dict[str, Any] = {}
        for event in events:
            if event.type in ("metrics", "eval") and event.data:
                latest.update(metrics_data(event))
            if event.type != "checkpoint" or not event.data:
                continue
            step = int(event.data.get("step") or 0)
            if not models.is_model_dir(Path(str(event.data.get("path")))):
                continue
            keys = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
            found.append(
                FineTuningJobCheckpoint(
                    id=f"{CHECKPOINT_PREFIX}{event.id}",
                    object="fine_tuning.job.checkpoint",
                    created_at=_ts(event.created_at) or 0,
                    fine_tuned_model_checkpoint=f"{name}:ckpt-step-{step}",
                    fine_tuning_job_id=job_id(task.id),
                    step_number=step,
                    metrics={"step": step, **{k: latest[k] for k in keys if k in latest}},
                )
            )
        found.reverse()
        if after:
            ids = [c.id for c in found]
            if after not in ids:
                raise BadRequestError(f"after '{after}' is not a checkpoint id of this job.", param="after")
            found = found[ids.index(after) + 1 :]
        return found[:limit], len(found) > limit

    # -- control ---------------------------------------------------------------------------
    def cancel(self, job: str) -> FineTuningJobOut:
        """Cancel a queued, running or paused job."""
        task = self.task(job)
        if task.status == TaskStatus.paused and self.store.move(
            task.id, TaskStatus.cancelled, (TaskStatus.paused,), "cancelled while paused"
        ):
            if task.pid and is_worker_of(task.pid, task.id):  # still saving its pause checkpoint: stop it now
                terminate_group(task.pid, None, self.settings.jobs.cancel_grace_seconds)
            return self.to_job(self.store.get(task.id))
        self.runner.cancel(task.id)
        return self.to_job(self.store.get(task.id))

    def pause(self, job: str) -> FineTuningJobOut:
        """Pause a job: a queued one stays out of the queue; a running one saves a checkpoint and exits."""
        task = self.task(job)
        if task.status == TaskStatus.running and task_processes(task) > 1:
            raise ConflictError("Pausing a job that runs on several processes is not supported; cancel it instead.")
        for status in (TaskStatus.queued, TaskStatus.running):
            if task.status == status and self.store.move(
                task.id, TaskStatus.paused, (status,), "paused: saving a checkpoint", finished_at=None
            ):
                task = self.store.get(task.id)
                if status == TaskStatus.running and self.runner.signal_worker(task.id, PAUSE_SIGNAL):
                    pass  # a Ray task: its actor relayed the signal to the worker
                elif status == TaskStatus.running and task.pid and is_worker_of(task.pid, task.id):
                    os.kill(task.pid, PAUSE_SIGNAL)  # the worker saves at its next step end and exits
                return self.to_job(task)
        task = self.store.get(task.id)
        raise ConflictError(
            f"Job '{job}' is {task.status}; only queued or running jobs can be paused.",
            details={"job": job, "status": task.status},
        )

    def resume(self, job: str) -> FineTuningJobOut:
        """Queue a paused job again; it continues from the checkpoint it saved when it paused."""
        task = self.task(job)
        if task.status != TaskStatus.paused:
            raise ConflictError(
                f"Job '{job}' is {task.status}; only paused jobs can be resumed.",
                details={"job": job, "status": task.status},
            )
        if task.pid and is_worker_of(task.pid, task.id):
            raise ConflictError(f"Job '{job}' is still saving its checkpoint; resume it in a moment.")
        checkpoint = last_checkpoint(Path(task.output_dir or ""))
        request = dict(task.request)
        request["resolved"] = {**request["resolved"], "resume_from_checkpoint": str(checkpoint) if checkpoint else None}
        with self.store.session() as s:
            s.execute(update(TaskRow).where(TaskRow.id == task.id).values(request=request))
        where = f"from {checkpoint.name}" if checkpoint else "from the start (no checkpoint was saved)"
        if not self.store.move(task.id, TaskStatus.queued, (TaskStatus.paused,), f"resumed {where}"):
            raise ConflictError(f"Job '{job}' is no longer paused.", details={"job": job})
        return self.to_job(self.store.get(task.id))

    # -- models ----------------------------------------------------------------------------
    def model_list(self, served: list[tuple[str, Path, float]]) -> list[Model]:
        """Served models as OpenAI Models: bases owned by the server, trained ones by the user (with parent)."""
        out = []
        for name, _, created in served:
            entry: dict[str, Any] = {"id": name, "created": int(created), "object": "model", "owned_by": "win-train"}
            if models.TASK_ID.match(name):
                task = self.store.get(name)
                meta = (task.request or {}).get("openai") or {}
                resolved = (task.request or {}).get("resolved") or {}
                entry.update(owned_by="user", parent=meta.get("model") or Path(resolved.get("model_path", "")).name)
                entry["id"] = models.fine_tuned_name(task) or name
            out.append(Model(**entry))
        return out

    def delete_model(self, name: str, served: list[tuple[str, Path, float]]) -> ModelDeleted:
        """Delete a trained model's weights (a fine-tuned name or a train task id); base models are refused."""
        match = models.FT_NAME.match(name)
        task_id = match["task"] if match and match["step"] is None else name
        if not models.TASK_ID.match(task_id):
            if any(entry[0] == name for entry in served):
                raise PermissionDeniedError(f"'{name}' is a base model; only fine-tuned models can be deleted.")
            raise NotFoundError(f"Model '{name}' was not found.", details={"model": name})
        path = models.resolve_model_ref(name, self.settings, self.store)  # 404/409 unless it is a ready model
        # Only the task's own marked folder, never through a link, never one holding another output (409 then).
        remove_output(path, TaskKind.train, task_id, name)
        self.store.add_event(task_id, "log", f"model deleted: {name}")
        return ModelDeleted(id=name, deleted=True, object="model")


def last_checkpoint(output_dir: Path) -> Path | None:
    """The highest-step checkpoint-N folder the trainer saved in output_dir."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
