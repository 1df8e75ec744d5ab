"""Training runs (Tinker-style low-level API): ORM rows for runs, their jobs and checkpoints, and schemas."""

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator
from sqlalchemy import JSON, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from entity.common import Seed, Temperature
from entity.inference import ChatMessage
from entity.task import Base, UTCDateTime, utcnow


class RunStatus(StrEnum):
    """starting -> ready -> paused (idle, state saved) | failed | deleted."""

    starting = "starting"
    ready = "ready"
    paused = "paused"
    failed = "failed"
    deleted = "deleted"


LIVE_RUN_STATUSES = (RunStatus.starting, RunStatus.ready)


class JobStatus(StrEnum):
    """queued -> running -> completed | failed."""

    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"


class RunRow(Base):
    """A training run: a worker process holding a base model, a LoRA and its optimizer state."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # a Tinker model id is `<session>:train:<n>`
    status: Mapped[str] = mapped_column(String(16), index=True)
    base_model: Mapped[str] = mapped_column(Text)
    base_path: Mapped[str] = mapped_column(Text)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    vocab_size: Mapped[int] = mapped_column(Integer)
    resume_from: Mapped[str | None] = mapped_column(Text, nullable=True)
    resume_optimizer: Mapped[int] = mapped_column(Integer, default=1)
    pending_grads: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the server whose process runs it


class RunJobRow(Base):
    """One primitive call on a run; a run's jobs execute in `seq` order."""

    __tablename__ = "run_jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    run_id: Mapped[str] = mapped_column(String(128), ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(24))
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CheckpointRow(Base):
    """A saved run state: a PEFT adapter folder plus optimizer state."""

    __tablename__ = "run_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# -- requests ---------------------------------------------------------------------------------------------


class LoraSpec(BaseModel):
    """The run's LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    r: StrictInt = Field(16, ge=1, le=1024)
    alpha: StrictInt = Field(32, ge=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class CreateRunRequest(BaseModel):
    """Body of POST /v1/runs: a fresh LoRA on a base model, or a run resumed from a saved state."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(None, description="Base model name or folder; default: the configured base.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    seed: Seed = 0
    from_state: str | None = Field(None, description="A saved state folder to start from (its base and LoRA).")
    with_optimizer: bool = Field(True, description="With from_state: also restore the optimizer state.")


class TokenExample(BaseModel):
    """A training example as token ids: predict target_ids[i] after input_ids[: i + 1]."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[StrictInt] = Field(..., min_length=1)
    target_ids: list[StrictInt] = Field(..., min_length=1)
    weights: list[StrictFloat] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> "TokenExample":
        """input_ids, target_ids and weights must line up."""
        if len(self.input_ids) != len(self.target_ids):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and target_ids ({len(self.target_ids)}) differ in length"
            )
        if self.weights is not None and len(self.weights) != len(self.input_ids):
            raise ValueError(f"weights ({len(self.weights)}) and input_ids ({len(self.input_ids)}) differ in length")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise ValueError("weights must not be negative")
        return self


class ChatExample(BaseModel):
    """A training example as a conversation: the loss covers the assistant turns."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(..., min_length=2)

    @field_validator("messages")
    @classmethod
    def _has_answer(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        """There must be an assistant turn to learn from."""
        if not any(m.role == "assistant" for m in value):
            raise ValueError("a conversation example needs at least one assistant turn")
        return value


class ForwardBackwardRequest(BaseModel):
    """Body of POST /v1/runs/{id}/forward_backward."""

    model_config = ConfigDict(extra="forbid")

    examples: list[TokenExample | ChatExample] = Field(..., min_length=1, max_length=4096)
    loss: Literal["cross_entropy"] = "cross_entropy"


class OptimStepRequest(BaseModel):
    """Body of POST /v1/runs/{id}/optim_step (AdamW)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: StrictFloat = Field(1e-4, gt=0, le=1)
    beta1: StrictFloat = Field(0.9, ge=0, lt=1)
    beta2: StrictFloat = Field(0.999, ge=0, lt=1)
    eps: StrictFloat = Field(1e-8, gt=0, le=1, description="Adam's epsilon.")
    weight_decay: StrictFloat = Field(0.0, ge=0, le=1)
    max_grad_norm: StrictFloat | None = Field(None, gt=0, description="Clip the gradient norm before the step.")


class SampleRequest(BaseModel):
    """Body of POST /v1/runs/{id}/sample: raw text prompts, or conversations (chat template applied)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] | None = Field(None, min_length=1, max_length=256)
    messages: list[list[ChatMessage]] | None = Field(None, min_length=1, max_length=256)
    num_samples: StrictInt = Field(1, ge=1, le=64)
    max_tokens: StrictInt = Field(64, ge=1, le=4096)
    temperature: Temperature = 1.0
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SampleRequest":
        """Exactly one of prompts and messages."""
        if (self.prompts is None) == (self.messages is None):
            raise ValueError("give exactly one of prompts or messages")
        return self


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class SaveStateRequest(BaseModel):
    """Body of POST /v1/runs/{id}/save_state."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN, description="Letters, digits, '.', '_' and '-'.")
    overwrite: bool = False


class LoadStateRequest(BaseModel):
    """Body of POST /v1/runs/{id}/load_state."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="A saved state folder (relative to the model dir), e.g. runs/<id>/<name>.")
    with_optimizer: bool = True


# -- responses --------------------------------------------------------------------------------------------


class RunOut(BaseModel):
    """A run as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: RunStatus
    base_model: str
    lora: dict[str, Any]
    seed: int
    vocab_size: int
    steps: int
    device: str | None
    error: str | None
    created_at: datetime
    last_used_at: datetime


class RunList(BaseModel):
    """Every run, newest first."""

    items: list[RunOut]


class JobOut(BaseModel):
    """A primitive call and, once done, its result."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    run_id: str
    kind: str
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobQueued(BaseModel):
    """Answer of a primitive: its job id, at once."""

    job_id: str
    run_id: str
    kind: str
    status: JobStatus


class CheckpointOut(BaseModel):
    """A saved state; `path` can be passed as `model` to inference, eval and export."""

    model_config = ConfigDict(from_attributes=True)

    run_id: str
    name: str
    path: str
    step: int
    created_at: datetime


class CheckpointList(BaseModel):
    """Saved states, newest first."""

    items: list[CheckpointOut]
