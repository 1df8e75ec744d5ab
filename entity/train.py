"""Request and response schemas of the training API."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, computed_field, model_validator

from entity.common import MAX_TRAIN_SEED
from entity.paths import ClientPath, root_role
from util.settings import Tracker

DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "apo_zero", "apo_down"
]


class LoraConfigIn(BaseModel):
    """PEFT LoRA hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    r: StrictInt = Field(16, ge=1, le=1024)
    lora_alpha: StrictInt = Field(32, ge=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    lora_dropout: StrictFloat = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on each adapted layer's input; 0 (the default) takes the fused LoRA path, which "
        "skips several passes over every layer's activations.",
    )


class TrainConfig(BaseModel):
    """Training hyperparameters; fields left out take the service defaults."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description="Base model name, or a model folder inside the roots.")
    per_device_train_batch_size: StrictInt | None = Field(
        None,
        ge=1,
        le=4096,
        description="Rows per device step. Left out: 2, or on a CUDA GPU with packing the auto token budget "
        "(tokens_per_step) picks it; given: it wins over the budget.",
    )
    gradient_accumulation_steps: StrictInt = Field(1, ge=1, le=4096)
    learning_rate: StrictFloat = Field(2e-4, gt=0, le=1)
    max_steps: StrictInt | None = Field(None, ge=1, le=10_000_000)
    num_train_epochs: StrictFloat | None = Field(None, gt=0, le=10_000)
    max_length: StrictInt | None = Field(
        None, ge=8, le=131_072, description="Tokens per record (default train.max_length)."
    )
    truncate: bool = Field(
        True, description="Cut records longer than max_length; false: leave them out (counted as skipped)."
    )
    warmup_ratio: StrictFloat = Field(0.0, ge=0, lt=1)
    weight_decay: StrictFloat = Field(0.0, ge=0, le=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    save_steps: StrictInt | None = Field(None, ge=1)
    logging_steps: StrictInt = Field(1, ge=1)
    seed: StrictInt = Field(42, ge=0, le=MAX_TRAIN_SEED)
    eval_dataset_path: str | None = None
    eval_steps: StrictInt | None = Field(None, ge=1, description="Evaluate every N steps (default: save_steps or 50).")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass (less memory, ~25% slower). Left out: off, unless "
        "the auto token budget needs it to fit a useful step.",
    )
    tokens_per_step: Annotated[StrictInt, Field(ge=8, le=1_048_576)] | Literal["auto"] | None = Field(
        None,
        description="Packed tokens per device step. auto: sized from the model, the strategy and the GPU's free "
        "memory (CUDA with packing; elsewhere 2 rows); the requested tokens per optimizer step (2 x max_length x "
        "gradient_accumulation_steps) are kept through gradient accumulation where the budget is smaller, and where "
        "it is larger the optimizer steps grow, max_steps/save_steps/eval_steps shrink by the same factor (same "
        "tokens in all) and the learning rate stays. A number: that many tokens per step (rows of max_length). "
        "Default: train.tokens_per_step of the config (auto). An explicit per_device_train_batch_size wins.",
    )
    assistant_only_loss: bool = Field(True, description="Compute the loss on assistant tokens only.")
    packing: bool | None = Field(
        None,
        description="Pack examples into rows of max_length tokens with no padding; position ids restart per "
        "example so attention never crosses examples. A step then holds per_device_train_batch_size x max_length "
        "tokens. Default: train.packing in the config (on with a CUDA GPU).",
    )
    attn_implementation: Literal["auto", "varlen", "flex_attention", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel; auto: for packed rows on CUDA, varlen (PyTorch's FlashAttention kernel over "
        "each example's span; flex attention where PyTorch lacks it), else the model's default (sdpa). varlen needs "
        "packing and a CUDA GPU.",
    )
    use_liger_kernel: bool | None = Field(
        None,
        description="Liger's fused kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); auto: on "
        "CUDA when liger-kernel is installed.",
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (slow first steps).")
    num_gpus: StrictInt | None = Field(
        None, ge=1, le=64, description="Processes (one per GPU) for this task; default train.num_gpus of the config."
    )
    distributed: Literal["ddp", "fsdp"] | None = Field(None, description="Default train.distributed of the config.")
    lora_config: LoraConfigIn | None = Field(
        None, description="LoRA settings (lora strategy: defaults when left out; dpo: LoRA when given, else full)."
    )
    beta: StrictFloat | None = Field(
        None, gt=0, le=100, description="dpo only: how far the policy may move from the reference (default 0.1)."
    )
    loss_type: DpoLoss | None = Field(None, description="dpo only: TRL's DPO loss (default sigmoid, the paper's).")
    report_to: Tracker | list[Tracker] | None = Field(
        None,
        description="Experiment trackers fed with the training metrics: none, tensorboard (event files in the output "
        "folder's tensorboard/), mlflow (train.mlflow_tracking_uri, default a store in the output folder's mlruns/), "
        "wandb (offline, into the output folder), or a list. Default: train.report_to in the config (tensorboard).",
    )

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        """Default to one epoch; refuse max_steps and num_train_epochs together."""
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("give max_steps or num_train_epochs, not both")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        """Refuse a token count and a batch size together: each sets the rows of a step."""
        if isinstance(self.tokens_per_step, int) and self.per_device_train_batch_size is not None:
            raise ValueError("give tokens_per_step or per_device_train_batch_size, not both")
        return self

    @model_validator(mode="after")
    def _trackers(self) -> "TrainConfig":
        """A tracker list names each tracker once, and "none" only alone."""
        if isinstance(self.report_to, list):
            if len(set(self.report_to)) != len(self.report_to):
                raise ValueError("report_to must not repeat a tracker")
            if "none" in self.report_to and len(self.report_to) > 1:
                raise ValueError('report_to "none" cannot be combined with trackers')
        return self


MAX_STAGES = 16


class StageConfig(BaseModel):
    """One stage of a multi-stage run; fields left out take the run's config."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=64, description="A label for the stage's metrics (default stage-N).")
    dataset_path: str | list[str] | None = Field(None, description="The stage's data (default: the run's).")
    max_length: StrictInt | None = Field(None, ge=8, le=131_072)
    truncate: bool | None = None
    max_steps: StrictInt | None = Field(None, ge=1, le=10_000_000)
    num_train_epochs: StrictFloat | None = Field(None, gt=0, le=10_000)
    learning_rate: StrictFloat | None = Field(None, gt=0, le=1)
    per_device_train_batch_size: StrictInt | None = Field(None, ge=1, le=4096)
    warmup_ratio: StrictFloat | None = Field(None, ge=0, lt=1)
    carry_optimizer: bool = Field(
        False, description="Continue the previous stage's optimizer state (moments) instead of a fresh optimizer."
    )

    @model_validator(mode="after")
    def _one_length(self) -> "StageConfig":
        """Refuse max_steps and num_train_epochs together."""
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("give max_steps or num_train_epochs, not both")
        return self


class TrainRequest(BaseModel):
    """Body of POST /api/train/start (also accepted as YAML, the format of `wintrain train start --config`)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = Field(
        ...,
        description="A registered strategy: 'trl' (full SFT), 'lora', or 'dpo' (preference data).",
        examples=["lora"],
    )
    dataset_path: str | list[str] = Field(
        ..., description="A chat data file, or several merged in order (relative to the data dir)."
    )
    output_dir: str | None = Field(None, description="Relative to the model dir; default outputs/<task_id>.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty output_dir.")
    resume_from_checkpoint: bool | str | None = Field(
        None,
        description="true: continue from the newest checkpoint in output_dir; a path: from that checkpoint folder "
        "(model, optimizer, scheduler, RNG and data position).",
    )
    config: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageConfig] | None = Field(
        None,
        min_length=1,
        max_length=MAX_STAGES,
        description="Train in stages, each continuing from the previous one's weights (e.g. short sequences first).",
    )

    @model_validator(mode="after")
    def _paths(self) -> "TrainRequest":
        """Require at least one dataset path and no empty ones."""
        paths = [self.dataset_path] if isinstance(self.dataset_path, str) else self.dataset_path
        if not paths or any(not p.strip() for p in paths):
            raise ValueError("dataset_path needs at least one non-empty path")
        return self

    def dataset_paths(self) -> list[str]:
        """The dataset paths as a list."""
        return [self.dataset_path] if isinstance(self.dataset_path, str) else list(self.dataset_path)


class TrainStarted(BaseModel):
    """Answer of POST /api/train/start."""

    task_id: str
    status: str
    output_dir: ClientPath = Field(..., description="Relative to its root (outputs/<task_id> in the model dir).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output_root(self) -> str | None:
        """The root holding output_dir: model, data or allowed_roots[i]."""
        return root_role(self.output_dir)
