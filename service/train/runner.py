"""Runs one training task inside the worker process."""

import json
import logging
import os
from pathlib import Path
from typing import Any

from entity.train import TrainConfig, TrainRequest
from service import models
from service.data import load_conversations
from service.tasks import TaskStore
from service.train.callbacks import StoreProgressCallback, finite
from service.train.strategies import STRATEGIES
from util.settings import Settings

log = logging.getLogger(__name__)


def build_dataset(path: Path, tokenizer: Any, assistant_only_loss: bool) -> Any:
    """Tokenise a chat file into input_ids (+ assistant_masks so TRL masks non-assistant labels)."""
    from datasets import Dataset

    conversations = load_conversations(path)
    if not conversations:
        raise ValueError(f"{path} has no valid conversations.")
    rows = [models.tokenize_with_assistant_mask(tokenizer, conv) for conv in conversations]
    if not assistant_only_loss:
        rows = [{"input_ids": r["input_ids"]} for r in rows]
    return Dataset.from_list(rows)


def build_sft_config(settings: Settings, cfg: TrainConfig, output_dir: Path, has_eval: bool, dtype: str) -> Any:
    """Translate the request into TRL's SFTConfig."""
    from trl import SFTConfig

    save_steps = cfg.save_steps or settings.train.save_steps
    length: dict[str, Any] = {"max_steps": cfg.max_steps} if cfg.max_steps else {}
    length["num_train_epochs"] = cfg.num_train_epochs or 1.0
    eval_args: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_args = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps or min(save_steps, 50)}
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_length=cfg.max_length or settings.train.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=settings.train.save_total_limit,
        seed=cfg.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **length,
        **eval_args,
    )


def run_training(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Train as the request says, save the result to output_dir, and return the final metrics."""
    from trl import SFTTrainer

    req = TrainRequest.model_validate(request["train"])
    resolved = request["resolved"]
    output_dir = Path(resolved["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(resolved["model_path"])
    strategy = STRATEGIES[req.strategy]()
    device, dtype = models.pick_device()
    store.add_event(task_id, "log", f"loading {model_path.name} on {device} ({dtype}) with strategy '{req.strategy}'")

    tokenizer = models.load_tokenizer(models.tokenizer_dir(model_path))
    train_ds = build_dataset(Path(resolved["dataset_path"]), tokenizer, req.config.assistant_only_loss)
    eval_ds = None
    if resolved.get("eval_dataset_path"):
        eval_ds = build_dataset(Path(resolved["eval_dataset_path"]), tokenizer, req.config.assistant_only_loss)
    store.add_event(
        task_id, "log", f"dataset: {len(train_ds)} train records" + (f", {len(eval_ds)} eval" if eval_ds else "")
    )

    model = strategy.load_model(model_path, dtype, device)
    # An adapter given as the model is already a trainable PeftModel: no second adapter on top.
    peft_config = None if hasattr(model, "peft_config") else strategy.peft_config(req.config)
    args = build_sft_config(settings, req.config, output_dir, eval_ds is not None, dtype)
    log_file = output_dir / "trainer_log.jsonl"
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StoreProgressCallback(store, task_id, log_file)],
    )
    is_adapter = hasattr(trainer.model, "peft_config")
    if is_adapter:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        store.add_event(task_id, "log", f"trainable parameters: {trainable:,} of {total:,}")
    result = trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "training_args.json").write_text(
        json.dumps(
            {
                "strategy": req.strategy,
                "request": req.model_dump(),
                "base_model": str(model_path),
                "device": device,
                "dtype": dtype,
                "sft_config": args.to_dict(),
            },
            indent=2,
            default=str,
        ),
        encoding="utf-8",
    )
    metrics = numeric_metrics(result.metrics)
    metrics["final_loss"] = finite(_last_loss(trainer.state.log_history))
    metrics["global_step"] = trainer.state.global_step
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    if eval_ds is not None:
        metrics.update(numeric_metrics(trainer.evaluate()))
    store.add_event(task_id, "log", f"saved {'adapter' if is_adapter else 'model'} to {output_dir}")
    log.info("task %s done in pid %s", task_id, os.getpid())
    return metrics


def numeric_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """Keep the numeric metrics, with NaN/inf as None so the result stays valid JSON."""
    return {k: (v if isinstance(v, int) else finite(v)) for k, v in values.items() if isinstance(v, (int, float))}


def _last_loss(history: list[dict[str, Any]]) -> float | None:
    """The most recent training loss in the trainer's log history."""
    for record in reversed(history):
        if "loss" in record:
            return float(record["loss"])
    return None
