"""The auto token budget: how many packed tokens a device step holds, sized from the model and the free GPU memory.

Memory model (bytes; P parameters, b bytes per weight (2 in bf16), L layers, h hidden size, i MLP size,
V vocabulary, r LoRA rank, A adapter parameters):

    static, full SFT  = 4·b·P                       weights, gradients and AdamW's two moments (weights' dtype)
    static, LoRA      = b·P + 16·A                  frozen base; fp32 adapter weights, gradients and moments
    per token         = L·b·(8h + 3i)               activations kept for the backward pass (no checkpointing)
                      = L·b·h + b·(8h + 3i)         with gradient checkpointing: each layer's input + one layer redone
                      + L·b·7r                      LoRA: the rank-r products of the 7 adapted linears of a layer
                      + V·(b + 8)                   without Liger's fused cross-entropy: the logits, fp32, their grad
    budget            = (free · (1 - MARGIN) - RESERVE - static) / per token

Calibration (bench/NOTES.md, H100, 0.40B Qwen2 shape, 49k vocabulary, bf16, Liger): the formula gives 10.97, 18.95
and 34.9 GiB at 8k, 16k and 32k tokens per step (measured 10.85, 18.89, 34.96) and 3.66 / 5.64 GiB with
checkpointing at 8k / 32k (measured 3.49 / 5.36).
"""

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from entity.train import LoraConfigIn, TrainConfig
from util.files import read_json, write_json
from util.settings import Settings

GIB = 2**30
MARGIN = 0.10  # of the free memory, left for the allocator's fragmentation and other users of the GPU
RESERVE = 2 * GIB  # CUDA context, optimizer-step temporaries, evaluation batches
BUSY_TOKENS = 16_384  # from this many tokens per step the H100 bench was GPU-bound (bench/NOTES.md)
CHECKPOINT_GAIN = 1.5  # checkpointing (~25% slower at one budget) only where it makes the step this much bigger
MIN_STEPS_PER_EPOCH = 8  # a small dataset still gets at least this many device steps per epoch
DEFAULT_BATCH = 2  # rows per device step when no budget applies (CPU, DPO, unpacked)


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    weight_bytes: int = 2

    @classmethod
    def of(cls, model: Any) -> "ModelShape":
        """The shape of a loaded transformers model (its base model's, for a PEFT model)."""
        config = model.config
        first = next(model.parameters())
        hidden = int(config.hidden_size)
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            vocab=int(config.vocab_size),
            weight_bytes=first.element_size(),
        )

    def weights_bytes(self) -> int:
        """The model's weights."""
        return self.params * self.weight_bytes


def adapter_params(shape: ModelShape, rank: int) -> int:
    """LoRA parameters on every linear of every layer (an upper bound for fewer target modules)."""
    # q, k, v, o: in + out <= 2h each; gate and up: h + i; down: i + h.
    return rank * shape.layers * (10 * shape.hidden + 3 * shape.intermediate)


def static_bytes(shape: ModelShape, lora_rank: int | None) -> int:
    """Memory that does not grow with the tokens of a step: weights, gradients, optimizer states."""
    if lora_rank is None:
        return 4 * shape.weight_bytes * shape.params
    return shape.weight_bytes * shape.params + 16 * adapter_params(shape, lora_rank)


def token_bytes(shape: ModelShape, lora_rank: int | None, checkpointing: bool, fused_loss: bool) -> int:
    """Activation memory per token of a step."""
    b, layer = shape.weight_bytes, shape.weight_bytes * (8 * shape.hidden + 3 * shape.intermediate)
    per_token = shape.layers * b * shape.hidden + layer if checkpointing else shape.layers * layer
    if lora_rank is not None:
        per_token += shape.layers * b * 7 * lora_rank
    if not fused_loss:
        per_token += shape.vocab * (b + 8)
    return per_token


def peak_bytes(shape: ModelShape, tokens: int, lora_rank: int | None, checkpointing: bool, fused_loss: bool) -> int:
    """The predicted peak memory of a step of `tokens` tokens."""
    return static_bytes(shape, lora_rank) + tokens * token_bytes(shape, lora_rank, checkpointing, fused_loss)


def fitting_tokens(shape: ModelShape, free: int, lora_rank: int | None, checkpointing: bool, fused_loss: bool) -> int:
    """How many tokens a step may hold in `free` bytes (free before the weights were loaded), margin included."""
    usable = free * (1 - MARGIN) - RESERVE - static_bytes(shape, lora_rank)
    return max(0, int(usable // token_bytes(shape, lora_rank, checkpointing, fused_loss)))


@dataclass
class Budget:
    """The chosen packed token budget of a device step and why."""

    tokens_per_step: int  # rows x max_length
    rows: int  # per_device_train_batch_size
    gradient_checkpointing: bool
    free_memory_gib: float  # the figure the budget was sized from (free memory plus the loaded weights)
    predicted_peak_gib: float
    limit: str  # memory | cap | dataset
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def choose_budget(
    shape: ModelShape,
    free: int,
    max_length: int,
    dataset_tokens: int,
    cap: int,
    lora_rank: int | None = None,
    checkpointing: bool | None = None,
    fused_loss: bool = True,
) -> Budget:
    """The packed tokens per device step: as many as fit `free` bytes, at most `cap` and 1/8 of the dataset.

    Whole rows of max_length tokens, at least one. Gradient checkpointing (when `checkpointing` is None) switches on
    when the budget without it stays under min(target, BUSY_TOKENS) tokens, where steps wait on the host, and with
    it the step holds at least CHECKPOINT_GAIN times as many tokens; the budget is then recomputed with it.
    """
    by_data = max(max_length, dataset_tokens // MIN_STEPS_PER_EPOCH)
    target, limit = (cap, "cap") if cap <= by_data else (by_data, "dataset")
    plain = fitting_tokens(shape, free, lora_rank, False, fused_loss)
    asked = checkpointing is not None
    if checkpointing is None:
        checkpointing = False
        if plain < min(target, BUSY_TOKENS):
            with_it = min(target, fitting_tokens(shape, free, lora_rank, True, fused_loss))
            checkpointing = with_it >= CHECKPOINT_GAIN * plain
    fits = fitting_tokens(shape, free, lora_rank, checkpointing, fused_loss) if checkpointing else plain
    if fits < target:
        target, limit = fits, "memory"
    rows = max(1, target // max_length)
    tokens = rows * max_length
    peak = peak_bytes(shape, tokens, lora_rank, checkpointing, fused_loss)
    why = {
        "memory": f"as many as fit {free / GIB:.1f} GiB of free device memory",
        "cap": f"the cap train.max_tokens_per_step={cap} (little speed gain past it)",
        "dataset": f"1/{MIN_STEPS_PER_EPOCH} of the dataset's {dataset_tokens} tokens (at least "
        f"{MIN_STEPS_PER_EPOCH} steps per epoch)",
    }[limit]
    reason = f"{rows} rows x {max_length} tokens: {why}; predicted peak {peak / GIB:.1f} GiB"
    if checkpointing:
        reason += ", gradient checkpointing on " + ("(as asked)" if asked else f"(without it only {plain} tokens fit)")
    if rows * max_length > fits:
        reason += "; even one row may not fit"
    return Budget(tokens, rows, checkpointing, round(free / GIB, 2), round(peak / GIB, 2), limit, reason)


def requested_tokens(cfg: TrainConfig, max_length: int) -> int:
    """The tokens per optimizer step a request without a batch size asks for: 2 rows x max_length x accumulation."""
    return DEFAULT_BATCH * max_length * cfg.gradient_accumulation_steps


def apply_budget(cfg: TrainConfig, budget: Budget, max_length: int) -> tuple[TrainConfig, dict[str, Any]]:
    """The config an auto budget gives, and what changed: rows, checkpointing, accumulation, step counts.

    The request's tokens per optimizer step R (requested_tokens) are kept where the budget B is smaller:
    gradient accumulation ceil(R / B). Where B is larger, one optimizer step holds B tokens: max_steps, save_steps,
    eval_steps and logging_steps given in the request shrink by B / R (rounded up) so that a run sees the same
    tokens; epochs count passes over the data and stay; the learning rate stays (see README: a sqrt-scaled rate
    would make the curve differ from the same budget set by hand, and raise the risk of divergence in fine-tuning).
    """
    requested = requested_tokens(cfg, max_length)
    update: dict[str, Any] = {
        "per_device_train_batch_size": budget.rows,
        "gradient_checkpointing": budget.gradient_checkpointing,
    }
    scale = 1.0
    if requested >= budget.tokens_per_step:
        update["gradient_accumulation_steps"] = math.ceil(requested / budget.tokens_per_step)
    else:
        scale = budget.tokens_per_step / requested
        update["gradient_accumulation_steps"] = 1
        for name in ("max_steps", "save_steps", "eval_steps", "logging_steps"):
            value = getattr(cfg, name)
            if value is not None and value > 1:
                update[name] = max(1, math.ceil(value / scale))
    record = {
        "mode": "auto",
        **budget.as_dict(),
        "requested_tokens_per_optimizer_step": requested,
        "tokens_per_optimizer_step": budget.tokens_per_step * update["gradient_accumulation_steps"],
        "gradient_accumulation_steps": update["gradient_accumulation_steps"],
        "step_scale": round(scale, 4),
        "rescaled": {
            k: [getattr(cfg, k), v]
            for k, v in update.items()
            if k.endswith("_steps") and k != "gradient_accumulation_steps" and getattr(cfg, k) != v
        },
    }
    return cfg.model_copy(update=update), record


def free_memory(settings: Settings, device: str, model: Any) -> int | None:
    """The device memory the budget may plan for (None: no figure, so no auto budget).

    On CUDA the GPU's free memory plus the weights already loaded on it (under torchrun its total memory, the same
    on every rank, so that all ranks take the same steps), at most train.budget_memory_gib; elsewhere that setting
    alone.
    """
    configured = settings.train.budget_memory_gib
    limit = None if configured is None else int(configured * GIB)
    if device != "cuda":
        return limit
    import torch

    free, total = torch.cuda.mem_get_info()
    free += sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank must choose the same steps: the card's size
        free = total
    return free if limit is None else min(free, limit)


def resolve_steps(
    settings: Settings,
    cfg: TrainConfig,
    *,
    device: str,
    packing: bool,
    model: Any,
    lora: bool,
    dataset_tokens: int,
    max_length: int,
    fused_loss: bool,
    previous: dict[str, Any] | None = None,
) -> tuple[TrainConfig, dict[str, Any]]:
    """The request's config with its step shape settled (rows, accumulation, checkpointing), and a record of it.

    An explicit per_device_train_batch_size wins; else a numeric tokens_per_step (request, then train.tokens_per_step)
    sets the rows; else auto sizes them on CUDA with packing (or with train.budget_memory_gib set); else 2 rows.
    `previous`: the auto budget this task chose when it first started (a resumed task keeps its step shape, so that
    its checkpoint's data position and step counts still hold).
    """
    mode = cfg.tokens_per_step if cfg.tokens_per_step is not None else settings.train.tokens_per_step
    fixed: dict[str, Any] = {"gradient_checkpointing": bool(cfg.gradient_checkpointing)}
    if cfg.per_device_train_batch_size is not None:
        how, rows = "batch size set", cfg.per_device_train_batch_size
    elif isinstance(mode, int):
        how, rows = f"tokens_per_step {mode}", max(1, mode // max_length)
    else:
        if previous is not None and previous.get("mode") == "auto" and packing:
            kept = Budget(**{f.name: previous[f.name] for f in fields(Budget)})
            cfg, record = apply_budget(cfg, kept, max_length)
            return cfg, record | {"reason": kept.reason + " (chosen when the task first started)"}
        free = free_memory(settings, device, model) if mode == "auto" and packing else None
        if free is not None:
            rank = (cfg.lora_config or LoraConfigIn()).r if lora else None
            shape = ModelShape.of(model)
            cap = settings.train.max_tokens_per_step
            per_rank = dataset_tokens // max(1, int(os.environ.get("WORLD_SIZE", "1")))  # each rank's share
            budget = choose_budget(shape, free, max_length, per_rank, cap, rank, cfg.gradient_checkpointing, fused_loss)
            return apply_budget(cfg, budget, max_length)
        why = "packing is off" if not packing else "no CUDA GPU and no train.budget_memory_gib"
        how, rows = ("tokens_per_step off" if mode == "off" else f"no auto budget: {why}"), DEFAULT_BATCH
    fixed["per_device_train_batch_size"] = rows
    record = {
        "mode": "fixed",
        "tokens_per_step": rows * max_length,
        "rows": rows,
        "gradient_checkpointing": fixed["gradient_checkpointing"],
        "reason": f"{rows} rows x {max_length} tokens ({how})",
    }
    return cfg.model_copy(update=fixed), record


BUDGET_FILE = "token_budget.json"


def load_previous(output_dir: Path, task_id: str) -> dict[str, Any] | None:
    """The budget this task recorded in its output folder when it first started (None: none, or another task's)."""
    path = output_dir / BUDGET_FILE
    try:
        saved = read_json(path)
    except (OSError, ValueError):
        return None
    return saved.get("budget") if saved.get("task_id") == task_id else None


def save(output_dir: Path, task_id: str, budget: dict[str, Any]) -> None:
    """Keep the chosen budget beside the checkpoints, for a resume of the same task."""
    write_json(output_dir / BUDGET_FILE, {"task_id": task_id, "budget": budget})
