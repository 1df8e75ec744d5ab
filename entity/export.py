"""Request and response schemas of the export API."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from entity.task import TaskOut

# torch.onnx's legacy exporter writes opsets 14-20 (14 is the first with scaled-dot-product attention);
# the dynamo exporter writes 18 and above.
MIN_OPSET = 14
MAX_OPSET = 23


class ExportBase(BaseModel):
    """Fields every export takes."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Base model name, a succeeded train task's id, or a model folder; default: the base model."
    )
    model_path: str | None = Field(None, description="Same as `model` (the older name).")
    output_path: str | None = Field(None, description="Relative to the model dir; default exports/<task_id>.")
    overwrite: bool = Field(False, description="Allow replacing an existing output.")
    wait: bool = Field(False, description="Block until the export has finished and return the task.")

    @model_validator(mode="after")
    def _one_model(self) -> "ExportBase":
        """`model` and `model_path` are the same field; give at most one."""
        if self.model is not None and self.model_path is not None and self.model != self.model_path:
            raise ValueError("give model or model_path, not both")
        return self

    @property
    def model_ref(self) -> str | None:
        """The model identifier, whichever field carried it."""
        return self.model if self.model is not None else self.model_path


class OnnxExportRequest(ExportBase):
    """Body of POST /api/export/onnx."""

    opset_version: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    dtype: Literal["float32", "float16"] = "float32"
    tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest accepted |logit difference| relative to the logit scale, i.e. the largest |logit| "
        "(at least 1); default 1e-4 for float32, 2e-2 for float16.",
    )


class MergedExportRequest(ExportBase):
    """Body of POST /api/export/merged: merge a LoRA output into its base."""


class ArchiveExportRequest(ExportBase):
    """Body of POST /api/export/archive: a tar.gz of the model or adapter with its tokenizer and logs."""


class ExportStarted(BaseModel):
    """Answer of an export request: the task, and with `wait` its final state."""

    task_id: str
    status: str
    output_path: str
    task: TaskOut | None = None
