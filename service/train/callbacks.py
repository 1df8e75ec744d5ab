"""A TrainerCallback that reports progress into the task store and trainer_log.jsonl."""

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from service.tasks import TaskStore
from service.train import pause


def finite(value: Any) -> float | None:
    """A JSON-safe float, or None for missing/NaN/inf."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class StoreProgressCallback(TrainerCallback):
    """Writes step progress to the task row, and each log record as an event and a JSONL line (rank 0 only)."""

    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        log_file: Path,
        step_offset: int = 0,
        later_steps: int = 0,
        stage: str | None = None,
    ) -> None:
        """Bind to a task and the trainer_log.jsonl path; a stage of a run adds its offset and later stages' steps."""
        self.store = store
        self.task_id = task_id
        self.log_file = log_file
        self.step_offset = step_offset
        self.later_steps = later_steps
        self.stage = stage
        self.started = time.monotonic()
        self.first_step = 0
        self.first_tokens = 0

    def _total(self, state: TrainerState) -> int:
        """Steps of the whole task: earlier stages, this one, and the planned later ones."""
        return self.step_offset + state.max_steps + self.later_steps

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Record the total step count once the trainer knows it (a resumed run starts at its checkpoint's step)."""
        self.started = time.monotonic()
        self.first_step = state.global_step
        self.first_tokens = state.num_input_tokens_seen or 0
        if not state.is_world_process_zero:
            return
        step, total = self.step_offset + state.global_step, self._total(state)
        self.store.update_progress(
            self.task_id, total_steps=total, current_step=step, progress=round(100.0 * step / max(total, 1), 2)
        )
        where = f"stage '{self.stage}': " if self.stage else ""
        self.store.add_event(self.task_id, "log", f"{where}training started: {state.max_steps} steps")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Update step, percent, epoch, throughput and ETA (across stages)."""
        if not state.is_world_process_zero:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = self.step_offset + state.global_step, max(self._total(state), 1)
        done_here = state.global_step - self.first_step
        tokens = (state.num_input_tokens_seen or 0) - self.first_tokens
        self.store.update_progress(
            self.task_id,
            current_step=step,
            total_steps=total,
            progress=round(min(100.0, 100.0 * step / total), 2),
            epoch=finite(state.epoch),
            tokens_per_second=round(tokens / elapsed, 2) if tokens > 0 else None,
            eta_seconds=round(elapsed / done_here * (total - step), 1) if done_here > 0 else None,
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        """Persist a log record (training loss, eval loss, or the final summary)."""
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "total_steps": state.max_steps, **{k: _json(v) for k, v in logs.items()}}
        tokens = (state.num_input_tokens_seen or 0) - self.first_tokens  # since this (re)start
        if "loss" in logs and tokens > 0:  # the dashboard's tokens/s curve
            record["tokens_per_second"] = round(tokens / max(time.monotonic() - self.started, 1e-9), 2)
        if self.stage:
            record = {"stage": self.stage, "task_step": self.step_offset + state.global_step, **record}
        with self.log_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if "loss" in logs:
            self.store.update_progress(
                self.task_id, loss=finite(logs.get("loss")), learning_rate=finite(logs.get("learning_rate"))
            )
            step = self.step_offset + state.global_step
            self.store.add_event(self.task_id, "metrics", f"step {step}: loss {logs['loss']:.4f}", record)
        elif "eval_loss" in logs:
            self.store.add_event(
                self.task_id, "eval", f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}", record
            )
        else:
            self.store.add_event(self.task_id, "log", "training summary", record)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Note each checkpoint."""
        if not state.is_world_process_zero:
            return
        self.store.add_event(
            self.task_id,
            "checkpoint",
            f"checkpoint saved at step {state.global_step}",
            {"step": state.global_step, "path": f"{args.output_dir}/checkpoint-{state.global_step}"},
        )


class LoadOptimizerState(TrainerCallback):
    """Start a stage with the previous stage's optimizer moments, keeping this stage's learning rate."""

    def __init__(self, path: Path) -> None:
        """Bind to the saved optimizer state_dict."""
        self.path = path

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Load the moments into the freshly built optimizer; its learning rates stay this stage's."""
        import torch

        optimizer = kw.get("optimizer")
        if optimizer is None:
            return
        keep = [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        for group, values in zip(optimizer.param_groups, keep, strict=True):
            group.update(values)


def _json(value: Any) -> Any:
    """Make a log value JSON-safe."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


class PauseCallback(TrainerCallback):
    """On a pause request (service.train.pause), save a checkpoint at the end of the current step and stop."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Turn a pending pause request into a save and a stop."""
        if pause.requested():
            control.should_save = True
            control.should_training_stop = True
