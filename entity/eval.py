"""Request and response schemas of the evaluation API."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from entity.common import ModelRef, Temperature
from entity.paths import ClientPath
from entity.task import TaskOut

Metric = Literal["loss", "perplexity", "accuracy", "bleu", "rouge_l"]
AccuracyMode = Literal["exact_match", "contains", "numeric"]


class GenerationParams(BaseModel):
    """How answers are generated for accuracy, BLEU and ROUGE-L."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: StrictInt = Field(128, ge=1, le=4096)
    temperature: Temperature = 0.0


class EvalRequest(ModelRef):
    """Body of POST /api/eval/evaluate."""

    dataset_path: str = Field(..., description="Chat data (relative to the data dir); the last turn is the answer.")
    metrics: list[Metric] = Field(default_factory=lambda: ["loss", "perplexity", "accuracy"], min_length=1)
    accuracy_mode: AccuracyMode = Field("exact_match", description="Which comparison `accuracy` reports.")
    batch_size: StrictInt = Field(8, ge=1, le=512)
    max_samples: StrictInt | None = Field(None, ge=1)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    compare_with: str | None = Field(None, description="A second model evaluated on the same data in the same task.")
    output_dir: str | None = Field(None, description="Relative to the data dir; default evals/<task_id>.")
    backend: Literal["native", "evalscope"] = "native"
    evalscope_dataset: Literal["general_qa", "general_mcq"] = Field(
        "general_qa", description="With backend=evalscope: the benchmark run on the local file."
    )
    wait: bool = Field(False, description="Block until the evaluation has finished and return the task.")

    @model_validator(mode="after")
    def _distinct_metrics(self) -> "EvalRequest":
        """No repeated metric."""
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics must not repeat")
        return self


class EvalStarted(BaseModel):
    """Answer of POST /api/eval/evaluate: the task, and with `wait` its final state and results."""

    task_id: str
    status: str
    output_dir: ClientPath = Field(..., description="Relative to its root (evals/<task_id> in the data dir).")
    task: TaskOut | None = None
