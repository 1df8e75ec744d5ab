"""Runs one training task inside the worker process."""

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entity.train import StageConfig, TrainConfig, TrainRequest
from service import models
from service.tasks import TaskStore
from service.train import attention, pause, tracking
from service.train import budget as token_budget
from service.train.budget import DEFAULT_BATCH, resolve_steps
from service.train.callbacks import LoadOptimizerState, PauseCallback, StoreProgressCallback, finite
from service.train.checkpoints import latest_checkpoint
from service.train.dataset import DataStats
from service.train.fused_lora import fuse_lora_layers
from service.train.model_card import model_card
from service.train.norms import use_native_rms_norm
from service.train.strategies import STRATEGIES
from util.files import claim_fresh, read_marker, release, write_text
from util.settings import Settings

log = logging.getLogger(__name__)
CLAIM_WAIT_SECONDS = 600  # how long ranks > 0 wait for rank 0 to claim the output folder
BUSY_GPU_TOKENS = 16384  # packed tokens per step from which the H100 bench's steps were GPU-bound (bench/NOTES.md)


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


def liger_for(cfg: TrainConfig) -> bool:
    """Whether the trainer runs Liger's kernels: the request's choice, else on where they can run."""
    return models.liger_available() if cfg.use_liger_kernel is None else cfg.use_liger_kernel


def common_args(
    settings: Settings,
    cfg: TrainConfig,
    output_dir: Path,
    has_eval: bool,
    dtype: str,
    distributed: dict[str, Any] | None = None,
    report_to: list[str] | None = None,
    run_name: str | None = None,
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
        per_device_train_batch_size=cfg.per_device_train_batch_size or DEFAULT_BATCH,
        per_device_eval_batch_size=cfg.per_device_train_batch_size or DEFAULT_BATCH,
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
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        use_liger_kernel=liger_for(cfg),
        torch_compile=cfg.torch_compile,
        include_num_input_tokens_seen="non_padding",
        report_to=report_to or "none",
        run_name=run_name,
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
    report_to: list[str] | None = None,
    run_name: str | None = None,
) -> Any:
    """Translate the request into TRL's SFTConfig."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(settings, cfg, output_dir, has_eval, dtype, distributed, report_to, run_name),
        # Packing: best-fit-decreasing rows of max_length tokens, flattened without padding; the collator restarts
        # position ids per example and masks the first label of each, so no example attends to or predicts another.
        packing=packing,
        padding_free=packing,
    )


@dataclass
class Stage:
    """One stage of a run: its config, data, output folder, and what it takes from the previous stage."""

    index: int
    name: str
    cfg: TrainConfig
    datasets: list[Path]
    output_dir: Path
    carry_optimizer: bool = False


def plan_stages(req: TrainRequest, resolved: dict[str, Any]) -> list[Stage]:
    """The stages a request runs: one for a plain request, else each `stages` entry over the run's config."""
    output_dir = Path(resolved["output_dir"])
    datasets = [Path(p) for p in resolved.get("dataset_paths") or [resolved["dataset_path"]]]
    if not req.stages:
        return [Stage(0, "main", req.config, datasets, output_dir)]
    stored = resolved.get("stages") or [{} for _ in req.stages]
    plans = []
    for i, (stage, extra) in enumerate(zip(req.stages, stored, strict=True)):
        plans.append(
            Stage(
                i,
                stage.name or f"stage-{i + 1}",
                stage_config(req.config, stage),
                [Path(p) for p in extra.get("dataset_paths") or []] or datasets,
                output_dir / f"stage-{i + 1}",
                stage.carry_optimizer,
            )
        )
    return plans


def stage_config(base: TrainConfig, stage: StageConfig) -> TrainConfig:
    """The run's config with the stage's own fields on top (a stage's length replaces the run's)."""
    fields = stage.model_dump(exclude={"name", "dataset_path", "carry_optimizer"}, exclude_none=True)
    if "max_steps" in fields or "num_train_epochs" in fields:
        base = base.model_copy(update={"max_steps": None, "num_train_epochs": None})
    return TrainConfig.model_validate({**base.model_dump(), **fields})


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
    data_stats: DataStats | None = None
    cfg: TrainConfig | None = None  # the stage's config with its step shape settled (resolve_steps)
    budget: dict[str, Any] | None = None  # how the step shape was chosen


def build_trainer(
    settings: Settings,
    store: TaskStore | None,
    task_id: str,
    request: dict[str, Any],
    stage: Stage | None = None,
    model_path: Path | None = None,
    callbacks: list[Any] | None = None,
    claimed: bool = False,
) -> BuiltTrainer:
    """The trainer of a train task or one of its stages (no store: no progress reporting, as in benches).

    `model_path` overrides the request's model (a later stage starts from the previous stage's saved weights).
    `claimed`: run_training has claimed the output folder already (else the first stage claims it).
    """
    req = TrainRequest.model_validate(request["train"])
    resolved = request["resolved"]
    stage = stage or plan_stages(req, resolved)[0]
    cfg, output_dir = stage.cfg, stage.output_dir
    if stage.index == 0 and not claimed:
        claim_or_wait(Path(resolved["output_dir"]), task_id, store)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The files may have changed since the request was checked: check the sources again.
    model_path = models.check_model_sources(model_path or Path(resolved["model_path"]), settings)
    strategy = STRATEGIES[req.strategy]()
    device, dtype = models.pick_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per rank under torchrun
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    packing = strategy.supports_packing and packing_for(settings, cfg, device)
    attn = attention_for(cfg, packing, device)
    _event(
        store,
        task_id,
        f"loading {model_path.name} on {device} ({dtype}, {attn or 'default'} attention, "
        f"packing {'on' if packing else 'off'}) with strategy '{req.strategy}'",
    )
    max_length = cfg.max_length or settings.train.max_length

    tokenizer = models.load_tokenizer(models.tokenizer_dir(model_path))
    train_ds, stats = strategy.build_dataset(stage.datasets, tokenizer, cfg, max_length)
    eval_ds = None
    if resolved.get("eval_dataset_path"):
        eval_cfg = cfg.model_copy(update={"truncate": True})  # every eval record counts, cut if need be
        eval_ds, _ = strategy.build_dataset([Path(resolved["eval_dataset_path"])], tokenizer, eval_cfg, max_length)
    _event(
        store,
        task_id,
        f"dataset: {stats.processed} train records ({stats.truncated} truncated, {stats.skipped} skipped as "
        f"longer than {max_length}, {stats.failed} failed)" + (f", {len(eval_ds)} eval" if eval_ds else ""),
        stats.as_dict(),
        "data",
    )
    if store is not None and stage.index == 0 and int(os.environ.get("RANK", "0")) == 0:
        store.update_progress(task_id, metrics={"data_stats": stats.as_dict()})

    model = strategy.load_model(model_path, dtype, device, attn)
    # An adapter given as the model is already a trainable PeftModel: no second adapter on top.
    peft_config = None if hasattr(model, "peft_config") else strategy.peft_config(cfg)
    cfg, budget = resolve_steps(
        settings,
        cfg,
        device=device,
        packing=packing,
        model=model,
        lora=hasattr(model, "peft_config") or peft_config is not None,
        dataset_tokens=sum(stats.lengths_after),
        max_length=max_length,
        fused_loss=strategy.supports_packing and liger_for(cfg),
        previous=token_budget.load_previous(output_dir, task_id),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        token_budget.save(output_dir, task_id, budget)
    _record_budget(store, task_id, stage, budget, stats, packing and device == "cuda")
    dist = distributed_args(resolved.get("distributed") or "ddp", device)
    report_to = resolved.get("report_to")
    if report_to is None:  # a task queued before report_to existed
        report_to = tracking.trackers(req.config.report_to, settings.train.report_to)
    tracking.apply(report_to, output_dir, settings)
    args = strategy.training_args(
        settings, cfg, output_dir, eval_ds is not None, dtype, packing, dist, report_to, task_id
    )
    trainer = strategy.trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[PauseCallback(), *(callbacks or [])],
    )
    fuse_lora_layers(trainer.model)
    if device == "cuda":  # one native call per norm: less host time per step than Liger's or the model's own
        use_native_rms_norm(trainer.model, trainer.args)
    built = BuiltTrainer(trainer, req, tokenizer, args, device, dtype, output_dir, model_path, eval_ds, stats)
    built.cfg, built.budget = cfg, budget
    return built


def _record_budget(
    store: TaskStore | None, task_id: str, stage: Stage, budget: dict[str, Any], stats: DataStats, gpu_packed: bool
) -> None:
    """The step shape and why, as an event and (first stage) in the task's metrics; a hint for small GPU steps."""
    where = f"stage '{stage.name}': " if stage.index else ""
    _event(store, task_id, f"{where}token budget: {budget['reason']}", budget, "budget")
    if gpu_packed and budget["mode"] == "fixed" and budget["tokens_per_step"] < BUSY_GPU_TOKENS:
        _event(
            store,
            task_id,
            f"packed steps hold up to {budget['tokens_per_step']} tokens; a GPU stays busy from about "
            f"{BUSY_GPU_TOKENS}: smaller steps wait on Python (leave the batch size out for the auto budget)",
        )
    if store is not None and stage.index == 0 and int(os.environ.get("RANK", "0")) == 0:
        store.update_progress(task_id, metrics={"data_stats": stats.as_dict(), "token_budget": budget})


def run_attempt(store: TaskStore | None, task_id: str) -> str | None:
    """What every rank of this start of the task shares, on every node, and no earlier start did: its start time.

    None without a store (benches) or when the store cannot say (an outage): then the task id alone is checked.
    """
    if store is None:
        return None
    try:
        started = store.get(task_id).started_at
    except Exception:  # noqa: BLE001 - an outage or a missing row: fall back to the task id alone
        return None
    return started.isoformat() if started else None


def claim_output_dir(output_dir: Path, task_id: str, store: TaskStore | None = None) -> None:
    """Make the output folder a fresh one marked as this task's train output, keeping its earlier content.

    The trainer opens its files by name: links planted in an earlier output would take its writes outside. The
    folder is rebuilt by claim_fresh (links dropped, mode 0700 until release() at the end), and refused when it
    holds anything but a train output (checked at request time too; the folder may have changed since).
    """
    dropped = claim_fresh(output_dir, "train", task_id, attempt=run_attempt(store, task_id))
    if dropped:
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        _event(store, task_id, f"the output folder held links or shared files, dropped or copied: {shown}")


def claim_or_wait(output_dir: Path, task_id: str, store: TaskStore | None) -> None:
    """Rank 0 claims the output folder; under torchrun the other ranks write into it only once rank 0 has."""
    if int(os.environ.get("RANK", "0")) == 0:
        claim_output_dir(output_dir, task_id, store)
    else:
        wait_for_claim(output_dir, task_id, store=store)


def wait_for_claim(
    output_dir: Path, task_id: str, timeout: float = CLAIM_WAIT_SECONDS, store: TaskStore | None = None
) -> None:
    """Wait until rank 0 has claimed the output folder for this start of the task (see run_attempt).

    A marker an earlier start of the same task left is not the claim: rank 0 is about to replace the folder.
    """
    deadline = time.monotonic() + timeout
    attempt = run_attempt(store, task_id)
    while True:
        marker = read_marker(output_dir) or {}
        if marker.get("task_id") == task_id and (attempt is None or marker.get("attempt") in (attempt, None)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not claim the output folder within {timeout:.0f} s")
        time.sleep(0.2)


def _event(
    store: TaskStore | None, task_id: str, message: str, data: dict[str, Any] | None = None, type_: str = "log"
) -> None:
    """An event on the task (when there is a store; under torchrun from rank 0 only)."""
    if store is not None and int(os.environ.get("RANK", "0")) == 0:
        store.add_event(task_id, type_, message, data)


STAGE_DONE = "stage_done.json"
STAGE_OPTIMIZER = "optimizer_state.pt"


def resume_point(stages: list[Stage], resolved: dict[str, Any]) -> tuple[int, str | None]:
    """Where a (re)started task begins: the first unfinished stage, and the checkpoint to resume it from.

    An auto-resumed task (resume_count > 0) continues from its own newest checkpoint; an explicit
    resume_from_checkpoint names one, inside this run's stage folders or anywhere for the first stage.
    """
    explicit = resolved.get("resume_from_checkpoint")
    if not explicit and not resolved.get("resume_count"):
        return 0, None
    start = next((s.index for s in stages if not (s.output_dir / STAGE_DONE).is_file()), len(stages))
    if start == len(stages):  # every stage finished before the interruption: redo only the last one's save
        start = len(stages) - 1
    checkpoint = Path(explicit) if explicit else latest_checkpoint(stages[start].output_dir)
    if checkpoint is not None and len(stages) > 1:
        owner = next((s.index for s in stages if checkpoint.parent == s.output_dir), None)
        if owner is not None and owner >= start:
            start = owner
        elif start > 0:  # a finished stage's checkpoint, or one from elsewhere: go on with the next stage
            checkpoint = None
    return start, str(checkpoint) if checkpoint else None


def run_training(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Train as the request says (stage by stage), save the result to output_dir, and return the final metrics.

    The output folder stays private (0700) while the task writes it, and gets its plain mode back when it ends,
    however it ends (see claim_output_dir).
    """
    try:
        return _run_stages(settings, store, task_id, request)
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            release(Path(request["resolved"]["output_dir"]), "train", task_id)


def _run_stages(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The body of run_training."""
    req = TrainRequest.model_validate(request["train"])
    resolved = request["resolved"]
    output_dir = Path(resolved["output_dir"])
    claim_or_wait(output_dir, task_id, store)  # before anything in it is read: a resume reads its checkpoints
    stages = plan_stages(req, resolved)
    start, checkpoint = resume_point(stages, resolved)
    if checkpoint:
        count = resolved.get("resume_count") or 0
        _event(store, task_id, f"resuming from {Path(checkpoint).name}" + (f" (resume {count})" if count else ""))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    stage_reports: list[dict[str, Any]] = []
    for done in stages[:start]:
        report = json.loads((done.output_dir / STAGE_DONE).read_text(encoding="utf-8"))
        stage_reports.append(report)
    offset = sum(r["global_step"] for r in stage_reports)
    model_path = stages[start - 1].output_dir if start else Path(resolved["model_path"])
    for stage in stages[start:]:
        later = sum(s.cfg.max_steps or 0 for s in stages[stage.index + 1 :])
        callbacks: list[Any] = []
        if rank0:
            callbacks.append(
                StoreProgressCallback(
                    store, task_id, output_dir / "trainer_log.jsonl", offset, later,
                    stage.name if len(stages) > 1 else None,
                )
            )  # fmt: skip
        resume_here = checkpoint if stage.index == start else None
        previous = stages[stage.index - 1].output_dir / STAGE_OPTIMIZER if stage.index else None
        if stage.carry_optimizer and previous is not None and previous.is_file() and not resume_here:
            callbacks.append(LoadOptimizerState(previous))
        if len(stages) > 1:
            _event(store, task_id, f"stage {stage.index + 1}/{len(stages)} '{stage.name}' from {model_path.name}")
        built = build_trainer(settings, store, task_id, request, stage, model_path, callbacks, claimed=True)
        report = _train_stage(built, resume_here, stage, stages, store, task_id)
        if report.get("paused"):
            return report
        stage_reports.append(report)
        offset += report["global_step"]
        model_path = stage.output_dir
    final = built
    if not final.trainer.is_world_process_zero():
        return report["metrics"]
    if len(stages) > 1:  # the last stage's weights are the run's result
        final.trainer.save_model(str(output_dir))
    final.tokenizer.save_pretrained(str(output_dir))
    data_stats = stage_reports[0]["data_stats"]
    write_text(
        output_dir / "training_args.json",
        json.dumps(
            {
                "strategy": req.strategy,
                "request": req.model_dump(),
                "base_model": resolved["model_path"],
                "device": final.device,
                "dtype": final.dtype,
                "world_size": final.args.world_size,
                "data_stats": data_stats,
                "token_budget": final.budget,
                "stages": stage_reports if len(stages) > 1 else None,
                "resume_count": resolved.get("resume_count") or 0,
                "sft_config": final.args.to_dict(),
            },
            indent=2,
            default=str,
        ),
    )
    metrics = dict(report["metrics"])
    metrics["global_step"] = offset
    metrics["data_stats"] = data_stats
    metrics["token_budget"] = final.budget
    metrics["resume_count"] = resolved.get("resume_count") or 0
    if len(stages) > 1:
        metrics["stages"] = stage_reports
    is_adapter = hasattr(final.trainer.model, "peft_config")
    eval_records = len(final.eval_ds) if final.eval_ds is not None else None
    train_records = int(data_stats["processed"]) if data_stats else 0
    card_req = req.model_copy(update={"config": final.cfg or req.config})  # the batch and accumulation that ran
    card = model_card(card_req, Path(resolved["model_path"]), is_adapter, train_records, eval_records, metrics, task_id)
    write_text(output_dir / "README.md", card)  # replaces TRL's card, which links a hub "None"
    store.add_event(task_id, "log", f"saved {'adapter' if is_adapter else 'model'} to {output_dir}")
    log.info("task %s done in pid %s", task_id, os.getpid())
    return metrics


def final_evaluation(trainer: Any) -> dict[str, Any]:
    """The eval metrics at the last step: reused when the trainer has just evaluated there, else evaluated now."""
    state = trainer.state
    last = next((r for r in reversed(state.log_history) if "eval_loss" in r), None)
    if last is not None and last.get("step") == state.global_step:
        return numeric_metrics({k: v for k, v in last.items() if k.startswith("eval_")})
    return numeric_metrics(trainer.evaluate())


def _train_stage(
    built: BuiltTrainer,
    checkpoint: str | None,
    stage: Stage,
    stages: list[Stage],
    store: TaskStore,
    task_id: str,
) -> dict[str, Any]:
    """Run one stage's trainer, save its weights (and, for a stage that carries it, the optimizer); its report."""
    trainer = built.trainer
    if hasattr(trainer.model, "peft_config") and stage.index == 0 and not checkpoint:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        _event(store, task_id, f"trainable parameters: {trainable:,} of {total:,}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if pause.requested():
        # The pause callback stopped at a step end and the trainer saved a checkpoint there; resume continues it.
        _event(store, task_id, f"paused at step {trainer.state.global_step}; checkpoint saved")
        return {"paused": True, "global_step": trainer.state.global_step}
    trainer.save_model(str(stage.output_dir))  # every rank takes part (FSDP gathers shards); rank 0 writes
    # Evaluation is collective under torchrun: every rank runs it before rank 0 alone writes the rest.
    eval_metrics = final_evaluation(trainer) if built.eval_ds is not None else {}
    metrics = numeric_metrics(result.metrics)
    metrics["final_loss"] = finite(_last_loss(trainer.state.log_history))
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics.update(eval_metrics)
    report = {
        "stage": stage.index + 1,
        "name": stage.name,
        "max_length": built.data_stats.max_length if built.data_stats else None,
        "learning_rate": stage.cfg.learning_rate,
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint,
        "data_stats": built.data_stats.as_dict() if built.data_stats else None,
        "token_budget": built.budget,
        "metrics": metrics,
    }
    if trainer.is_world_process_zero() and len(stages) > 1:
        following = stages[stage.index + 1] if stage.index + 1 < len(stages) else None
        if following is not None and following.carry_optimizer:
            import torch

            torch.save(trainer.optimizer.state_dict(), stage.output_dir / STAGE_OPTIMIZER)
        write_text(stage.output_dir / STAGE_DONE, json.dumps(report, indent=2, default=str))
    if len(stages) > 1:
        _event(store, task_id, f"stage '{stage.name}' done at step {trainer.state.global_step}", report, "stage")
    return report


def numeric_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """Keep the numeric metrics, with NaN/inf as None so the result stays valid JSON."""
    return {k: (v if isinstance(v, int) else finite(v)) for k, v in values.items() if isinstance(v, (int, float))}


def _last_loss(history: list[dict[str, Any]]) -> float | None:
    """The most recent training loss in the trainer's log history."""
    for record in reversed(history):
        if "loss" in record:
            return float(record["loss"])
    return None
