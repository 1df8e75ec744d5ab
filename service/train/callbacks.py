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

    def __init__(self, store: TaskStore, task_id: str, log_file: Path) -> None:
        """Bind to a task and the trainer_log.jsonl path."""
        self.store = store
        self.task_id = task_id
        self.log_file = log_file
        self.started = time.monotonic()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Record the total step count once the trainer knows it."""
        self.started = time.monotonic()
        if not state.is_world_process_zero:
            return
        self.store.update_progress(self.task_id, total_steps=state.max_steps, current_step=0, progress=0.0)
        self.store.add_event(self.task_id, "log", f"training started: {state.max_steps} steps")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Update step, percent, epoch, throughput and ETA."""
        if not state.is_world_process_zero:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        step, total = state.global_step, max(state.max_steps, 1)
        tokens = state.num_input_tokens_seen or 0
        self.store.update_progress(
            self.task_id,
            current_step=step,
            total_steps=state.max_steps,
            progress=round(min(100.0, 100.0 * step / total), 2),
            epoch=finite(state.epoch),
            tokens_per_second=round(tokens / elapsed, 2) if tokens else None,
            eta_seconds=round(elapsed / step * (total - step), 1) if step else None,
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
        with self.log_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if "loss" in logs:
            self.store.update_progress(
                self.task_id, loss=finite(logs.get("loss")), learning_rate=finite(logs.get("learning_rate"))
            )
            self.store.add_event(self.task_id, "metrics", f"step {state.global_step}: loss {logs['loss']:.4f}", record)
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
