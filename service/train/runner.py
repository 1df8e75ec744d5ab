"""Runs one training task inside the worker process."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entity.train import TrainConfig, TrainRequest
from service import models
from service.data import load_conversations
from service.tasks import TaskStore
from service.train import attention, pause
from service.train.callbacks import PauseCallback, StoreProgressCallback, finite
from service.train.fused_lora import fuse_lora_layers
from service.train.strategies import STRATEGIES
from util.settings import Settings

log = logging.getLogger(__name__)
BUSY_GPU_TOKENS = 16384  # packed tokens per step from which the H100 bench's steps were GPU-bound (bench/NOTES.md)


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


def packing_for(settings: Settings, cfg: TrainConfig, device: str) -> bool:
    """Whether to pack: the request's choice, else the configured default (auto: on CUDA)."""
    if cfg.packing is not None:
        return cfg.packing
    return settings.train.packing == "on" or (settings.train.packing == "auto" and device == "cuda")


def attention_for(cfg: TrainConfig, packing: bool, device: str) -> str | None:
    """The attention kernel to load the model with (None: the model's default)."""
    wanted = cfg.attn_implementation
    if wanted == "auto":
        if not (packing and device == "cuda"):
            return None
        # Packed rows need document masking: run each example's span alone, or skip the masked blocks.
        wanted = "varlen" if attention.available() else "flex_attention"
    if wanted == "varlen":
        if not (packing and attention.available()):
            raise ValueError("varlen attention needs packing and a CUDA GPU with PyTorch's varlen attention")
        return attention.register()
    return wanted


def distributed_args(distributed: str, device: str) -> dict[str, Any]:
    """Trainer arguments for a run under torchrun (none for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if distributed == "fsdp":
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}
    return {"ddp_backend": "nccl" if device == "cuda" else "gloo", "ddp_find_unused_parameters": False}


def common_args(
    settings: Settings,
    cfg: TrainConfig,
    output_dir: Path,
    has_eval: bool,
    dtype: str,
    distributed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The TrainingArguments every strategy's config shares (SFTConfig and DPOConfig both extend them)."""
    save_steps = cfg.save_steps or settings.train.save_steps
    length: dict[str, Any] = {"max_steps": cfg.max_steps} if cfg.max_steps else {}
    length["num_train_epochs"] = cfg.num_train_epochs or 1.0
    eval_args: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_args = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps or min(save_steps, 50)}
    return dict(
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
        use_liger_kernel=models.liger_available() if cfg.use_liger_kernel is None else cfg.use_liger_kernel,
        torch_compile=cfg.torch_compile,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **length,
        **eval_args,
        **(distributed or {}),
    )


def build_sft_config(
    settings: Settings,
    cfg: TrainConfig,
    output_dir: Path,
    has_eval: bool,
    dtype: str,
    packing: bool,
    distributed: dict[str, Any] | None = None,
) -> Any:
    """Translate the request into TRL's SFTConfig."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(settings, cfg, output_dir, has_eval, dtype, distributed),
        # Packing: best-fit-decreasing rows of max_length tokens, flattened without padding; the collator restarts
        # position ids per example and masks the first label of each, so no example attends to or predicts another.
        packing=packing,
        padding_free=packing,
    )


@dataclass
class BuiltTrainer:
    """The SFTTrainer of a train task and what the rest of the run needs."""

    trainer: Any
    req: TrainRequest
    tokenizer: Any
    args: Any
    device: str
    dtype: str
    output_dir: Path
    model_path: Path
    eval_ds: Any


def build_trainer(settings: Settings, store: TaskStore | None, task_id: str, request: dict[str, Any]) -> BuiltTrainer:
    """The trainer a train task runs (no store: no progress reporting, as in tests and benches)."""
    req = TrainRequest.model_validate(request["train"])
    resolved = request["resolved"]
    output_dir = Path(resolved["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(resolved["model_path"])
    strategy = STRATEGIES[req.strategy]()
    device, dtype = models.pick_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per rank under torchrun
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    packing = strategy.supports_packing and packing_for(settings, req.config, device)
    attn = attention_for(req.config, packing, device)
    _event(
        store,
        task_id,
        f"loading {model_path.name} on {device} ({dtype}, {attn or 'default'} attention, "
        f"packing {'on' if packing else 'off'}) with strategy '{req.strategy}'",
    )
    step_tokens = req.config.per_device_train_batch_size * (req.config.max_length or settings.train.max_length)
    if packing and device == "cuda" and step_tokens < BUSY_GPU_TOKENS:
        _event(
            store,
            task_id,
            f"packed steps hold up to {step_tokens} tokens; a GPU stays busy from about {BUSY_GPU_TOKENS} "
            "(per_device_train_batch_size x max_length): smaller steps wait on Python",
        )

    tokenizer = models.load_tokenizer(models.tokenizer_dir(model_path))
    train_ds = strategy.build_dataset(Path(resolved["dataset_path"]), tokenizer, req.config)
    eval_ds = None
    if resolved.get("eval_dataset_path"):
        eval_ds = strategy.build_dataset(Path(resolved["eval_dataset_path"]), tokenizer, req.config)
    _event(store, task_id, f"dataset: {len(train_ds)} train records" + (f", {len(eval_ds)} eval" if eval_ds else ""))

    model = strategy.load_model(model_path, dtype, device, attn)
    # An adapter given as the model is already a trainable PeftModel: no second adapter on top.
    peft_config = None if hasattr(model, "peft_config") else strategy.peft_config(req.config)
    dist = distributed_args(resolved.get("distributed") or "ddp", device)
    args = strategy.training_args(settings, req.config, output_dir, eval_ds is not None, dtype, packing, dist)
    callbacks: list[Any] = [PauseCallback()]
    if store:
        callbacks.append(StoreProgressCallback(store, task_id, output_dir / "trainer_log.jsonl"))
    trainer = strategy.trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    fuse_lora_layers(trainer.model)
    return BuiltTrainer(trainer, req, tokenizer, args, device, dtype, output_dir, model_path, eval_ds)


def _event(store: TaskStore | None, task_id: str, message: str) -> None:
    """A log event on the task (when there is a store; under torchrun from rank 0 only)."""
    if store is not None and int(os.environ.get("RANK", "0")) == 0:
        store.add_event(task_id, "log", message)


def run_training(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Train as the request says, save the result to output_dir, and return the final metrics."""
    built = build_trainer(settings, store, task_id, request)
    trainer, req, tokenizer, args = built.trainer, built.req, built.tokenizer, built.args
    output_dir, model_path, eval_ds = built.output_dir, built.model_path, built.eval_ds
    is_adapter = hasattr(trainer.model, "peft_config")
    if is_adapter:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        _event(store, task_id, f"trainable parameters: {trainable:,} of {total:,}")
    resume = (request.get("resolved") or {}).get("resume_from_checkpoint")
    if resume:
        _event(store, task_id, f"resuming from {Path(resume).name}")
    result = trainer.train(resume_from_checkpoint=resume)
    if pause.requested():
        # The pause callback stopped at a step end and the trainer saved a checkpoint there; resume continues it.
        _event(store, task_id, f"paused at step {trainer.state.global_step}; checkpoint saved")
        return {"paused": True, "global_step": trainer.state.global_step}
    trainer.save_model(str(output_dir))  # every rank takes part (FSDP gathers shards); rank 0 writes
    # Evaluation is collective under torchrun: every rank runs it before rank 0 alone writes the rest.
    eval_metrics = numeric_metrics(trainer.evaluate()) if eval_ds is not None else {}
    if not trainer.is_world_process_zero():
        return numeric_metrics(result.metrics)
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / "training_args.json").write_text(
        json.dumps(
            {
                "strategy": req.strategy,
                "request": req.model_dump(),
                "base_model": str(model_path),
                "device": built.device,
                "dtype": built.dtype,
                "world_size": args.world_size,
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
    metrics.update(eval_metrics)
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
