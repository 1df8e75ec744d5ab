"""Request and response schemas of the data API."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ValidateRequest(BaseModel):
    """Body of POST /api/data/validate (file_path may also come as a query parameter)."""

    model_config = ConfigDict(extra="forbid")

    file_path: str | None = Field(None, description="Relative to the data dir, or absolute inside an allowed root.")
    max_length: int | None = Field(None, ge=1, description="Count records whose tokenised length exceeds this.")
    model: str | None = Field(None, description="Model whose chat template measures lengths; default base model.")


class RecordError(BaseModel):
    """One invalid record: where it is and why."""

    line: int
    reason: str


class LengthStats(BaseModel):
    """Token-length statistics of the valid records under the chat template."""

    min: int
    mean: float
    median: float
    p95: float
    max: int
    max_length: int
    over_max_length: int


class ValidateResponse(BaseModel):
    """What validate found in a file."""

    file_path: str
    valid: bool
    total: int
    valid_count: int
    invalid_count: int
    formats: dict[str, int]
    errors: list[RecordError]
    errors_truncated: bool
    token_stats: LengthStats | None
    kind: Literal["chat", "preference"] | None = Field(
        None, description="chat (SFT) or preference (DPO) records; set by the file's first valid record."
    )


class SplitConfig(BaseModel):
    """Ratios and shuffling of a train/val/test split."""

    model_config = ConfigDict(extra="forbid")

    train_ratio: float = Field(0.8, ge=0, le=1)
    val_ratio: float = Field(0.1, ge=0, le=1)
    test_ratio: float = Field(0.1, ge=0, le=1)
    shuffle: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> "SplitConfig":
        """Refuse ratios that do not add up to 1."""
        total = self.train_ratio + self.val_ratio + self.test_ratio
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_ratio + val_ratio + test_ratio must equal 1 (got {total:g})")
        return self


class ProcessRequest(BaseModel):
    """Body of POST /api/data/process."""

    model_config = ConfigDict(extra="forbid")

    input_file: str
    output_dir: str = Field(..., description="Relative to the data dir, or absolute inside an allowed root.")
    split_config: SplitConfig = Field(default_factory=SplitConfig)
    overwrite: bool = Field(False, description="Replace existing train/val/test files in output_dir.")


class SplitFile(BaseModel):
    """One written split."""

    path: str
    count: int


class ProcessResponse(BaseModel):
    """What process wrote."""

    input_file: str
    output_dir: str
    total: int
    kept: int
    invalid_dropped: int
    duplicates_dropped: int
    splits: dict[str, SplitFile]


class UploadResponse(BaseModel):
    """Where an uploaded file was stored."""

    file_path: str
    size_bytes: int
