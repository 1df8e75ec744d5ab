"""Request and response schemas of the training API."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "apo_zero", "apo_down"
]


class LoraConfigIn(BaseModel):
    """PEFT LoRA hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    lora_dropout: float = Field(
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
    per_device_train_batch_size: int = Field(2, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    num_train_epochs: float | None = Field(None, gt=0, le=10_000)
    max_length: int | None = Field(None, ge=8, le=131_072)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    save_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    eval_dataset_path: str | None = None
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: save_steps or 50).")
    gradient_checkpointing: bool = False
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
    num_gpus: int | None = Field(
        None, ge=1, le=64, description="Processes (one per GPU) for this task; default train.num_gpus of the config."
    )
    distributed: Literal["ddp", "fsdp"] | None = Field(None, description="Default train.distributed of the config.")
    lora_config: LoraConfigIn | None = Field(
        None, description="LoRA settings (lora strategy: defaults when left out; dpo: LoRA when given, else full)."
    )
    beta: float | None = Field(
        None, gt=0, le=100, description="dpo only: how far the policy may move from the reference (default 0.1)."
    )
    loss_type: DpoLoss | None = Field(None, description="dpo only: TRL's DPO loss (default sigmoid, the paper's).")

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        """Default to one epoch; refuse max_steps and num_train_epochs together."""
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("give max_steps or num_train_epochs, not both")
        return self


class TrainRequest(BaseModel):
    """Body of POST /api/train/start."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = Field(
        ...,
        description="A registered strategy: 'trl' (full SFT), 'lora', or 'dpo' (preference data).",
        examples=["lora"],
    )
    dataset_path: str
    output_dir: str | None = Field(None, description="Relative to the model dir; default outputs/<task_id>.")
    overwrite: bool = Field(False, description="Allow writing into a non-empty output_dir.")
    config: TrainConfig = Field(default_factory=TrainConfig)


class TrainStarted(BaseModel):
    """Answer of POST /api/train/start."""

    task_id: str
    status: str
    output_dir: str
