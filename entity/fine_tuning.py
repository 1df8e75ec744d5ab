"""OpenAI fine-tuning API: the stored-file row and the job request schemas (responses are the openai types)."""

from typing import Literal

from openai.types import FileObject, Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator
from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from entity.task import Base

Auto = Literal["auto"]


class FileRow(Base):
    """A file uploaded through /v1/files (or a job's results file), stored under the data dir."""

    __tablename__ = "openai_files"

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)  # chat | preference (data service's kind)
    records: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)  # results file of a job


class Hyperparameters(BaseModel):
    """Training hyperparameters; "auto" (or leaving one out) resolves by the rule in service.fine_tuning.jobs."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | StrictInt | None = Field(None, description="Epochs over the training file (1-50).")
    batch_size: Auto | StrictInt | None = Field(None, description="Examples per optimizer step (1-256).")
    learning_rate_multiplier: Auto | StrictFloat | None = Field(None, description="Scales the base learning rate.")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Auto | int | None) -> Auto | int | None:
        """1 to 50 epochs."""
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("n_epochs must be between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Auto | int | None) -> Auto | int | None:
        """1 to 256 examples."""
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("batch_size must be between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Auto | float | None) -> Auto | float | None:
        """A positive factor up to 100."""
        if isinstance(v, (int, float)) and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be above 0 and at most 100")
        return v


class DpoHyperparameters(Hyperparameters):
    """DPO hyperparameters: the common ones plus beta."""

    beta: Auto | StrictFloat | None = Field(None, description="DPO beta; auto is 0.1.")

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Auto | float | None) -> Auto | float | None:
        """A positive beta up to 100."""
        if isinstance(v, (int, float)) and not 0 < v <= 100:
            raise ValueError("beta must be above 0 and at most 100")
        return v


class SupervisedMethod(BaseModel):
    """method.supervised."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class DpoMethod(BaseModel):
    """method.dpo."""

    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """How the job trains: supervised (SFT with LoRA) or dpo (DPO with LoRA); reinforcement is not offered."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict | None = None


class JobCreateRequest(BaseModel):
    """Body of POST /v1/fine_tuning/jobs (OpenAI's JobCreateParams)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="A base model name, or a fine_tuned_model to train further.")
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        """At most 16 pairs, keys up to 64 characters, values up to 512."""
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("metadata holds at most 16 key-value pairs")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return v


class FineTuningJobOut(FineTuningJob):
    """OpenAI's FineTuningJob; its status also takes "paused", as OpenAI's API answers after a pause."""

    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]  # type: ignore[assignment]


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobList(BaseModel):
    """A page of fine-tuning jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobOut]
    has_more: bool


class JobEventList(BaseModel):
    """A page of a job's events, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointList(BaseModel):
    """A page of a job's checkpoints, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ModelList(BaseModel):
    """GET /v1/models: base and trained models."""

    object: Literal["list"] = "list"
    data: list[Model]
