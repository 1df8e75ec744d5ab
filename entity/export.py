"""Request and response schemas of the export API."""

from typing import Literal

from pydantic import BaseModel, Field, StrictFloat, StrictInt

from entity.common import ModelRef
from entity.paths import ClientPath
from entity.task import TaskOut

# torch.onnx's legacy exporter writes opsets 14-20 (14 is the first with scaled-dot-product attention);
# the dynamo exporter writes 18 and above.
MIN_OPSET = 14
MAX_OPSET = 23


class ExportBase(ModelRef):
    """Fields every export takes."""

    output_path: str | None = Field(None, description="Relative to the model dir; default exports/<task_id>.")
    overwrite: bool = Field(False, description="Allow replacing an existing output.")
    wait: bool = Field(False, description="Block until the export has finished and return the task.")


class OnnxExportRequest(ExportBase):
    """Body of POST /api/export/onnx."""

    opset_version: StrictInt = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    dtype: Literal["float32", "float16"] = "float32"
    tolerance: StrictFloat | None = Field(
        None,
        gt=0,
        description="Largest accepted |logit difference| relative to the logit scale, i.e. the largest |logit| "
        "(at least 1); default 1e-4 for float32, 2e-2 for float16.",
    )


class MergedExportRequest(ExportBase):
    """Body of POST /api/export/merged: merge a LoRA output into its base."""


class ArchiveExportRequest(ExportBase):
    """Body of POST /api/export/archive: a tar.gz of the model or adapter with its tokenizer and logs."""


class GgufExportRequest(ExportBase):
    """Body of POST /api/export/gguf: a llama.cpp / Ollama file of a Llama-family model (LoRA merged first)."""

    type: Literal["f16", "bf16", "q8_0"] = Field("f16", description="Tensor type of the weight matrices.")
    tolerance: StrictFloat | None = Field(
        None,
        gt=0,
        description="Largest accepted |logit difference| of the file read back, relative to the logit scale; "
        "default 2e-2 for f16, 5e-2 for bf16, 1e-1 for q8_0.",
    )


class ExportStarted(BaseModel):
    """Answer of an export request: the task, and with `wait` its final state."""

    task_id: str
    status: str
    output_path: ClientPath = Field(..., description="Relative to its root (exports/<task_id> in the model dir).")
    task: TaskOut | None = None
