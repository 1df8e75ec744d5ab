"""Request and response schemas of the data API."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, computed_field, model_validator

from entity.common import MAX_SEED
from entity.paths import ClientPath, root_role


class ValidateRequest(BaseModel):
    """Body of POST /api/data/validate (file_path may also come as a query parameter)."""

    model_config = ConfigDict(extra="forbid")

    file_path: str | None = Field(None, description="Relative to the data dir, or absolute inside an allowed root.")
    max_length: StrictInt | None = Field(None, ge=1, description="Count records whose tokenised length exceeds this.")
    model: str | None = Field(None, description="Model whose chat template measures lengths; default base model.")


class RecordError(BaseModel):
    """One invalid record: where it is and why."""

    line: int
    reason: str


class DuplicateRecord(BaseModel):
    """A record whose normalised conversation equals an earlier one's (process keeps the first)."""

    line: int = Field(..., description="Line (JSONL) or 1-based index (JSON array) of the duplicate.")
    duplicate_of: int = Field(..., description="Line or index of the first record with the same conversation.")


class HistogramBin(BaseModel):
    """Records whose token length lies in [start, end) (the last bin includes its end)."""

    start: int
    end: int
    count: int


class LengthStats(BaseModel):
    """Token-length statistics of the valid records under the chat template."""

    min: int
    mean: float
    median: float
    p95: float
    max: int
    max_length: int
    over_max_length: int
    histogram: list[HistogramBin] = Field(default_factory=list, description="Token-length histogram (<= 20 bins).")


class ValidateResponse(BaseModel):
    """What validate found in a file."""

    file_path: ClientPath
    valid: bool
    total: int
    valid_count: int
    invalid_count: int
    formats: dict[str, int]
    errors: list[RecordError]
    errors_truncated: bool
    duplicate_count: int = Field(
        0,
        description="Valid records equal to an earlier one after normalisation (any format): the number process "
        "drops as duplicates_dropped.",
    )
    duplicates: list[DuplicateRecord] = Field(
        default_factory=list, description="The first data.max_errors_reported duplicates."
    )
    token_stats: LengthStats | None
    kind: Literal["chat", "preference"] | None = Field(
        None, description="chat (SFT) or preference (DPO) records; set by the file's first valid record."
    )


class SplitConfig(BaseModel):
    """Ratios and shuffling of a train/val/test split."""

    model_config = ConfigDict(extra="forbid")

    train_ratio: StrictFloat = Field(0.8, ge=0, le=1)
    val_ratio: StrictFloat = Field(0.1, ge=0, le=1)
    test_ratio: StrictFloat = Field(0.1, ge=0, le=1)
    shuffle: bool = True
    seed: StrictInt = Field(42, ge=0, le=MAX_SEED)

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

    input_file: str | None = Field(None, description="One input file (or use input_files).")
    input_files: list[str] | None = Field(
        None, min_length=1, max_length=256, description="Several input files, merged in order and deduplicated."
    )
    output_dir: str = Field(..., description="Relative to the data dir, or absolute inside an allowed root.")
    split_config: SplitConfig = Field(default_factory=SplitConfig)
    overwrite: bool = Field(False, description="Replace existing train/val/test files in output_dir.")

    @model_validator(mode="after")
    def _one_input(self) -> "ProcessRequest":
        """Require input_file or input_files, not both."""
        if (self.input_file is None) == (self.input_files is None):
            raise ValueError("give input_file or input_files (not both)")
        return self

    def inputs(self) -> list[str]:
        """The input files in merge order."""
        return [self.input_file] if self.input_file is not None else list(self.input_files or [])


class SplitFile(BaseModel):
    """One written split."""

    path: ClientPath = Field(..., description="Relative to the data dir (or to the allowed root that holds it).")
    count: int


class ProcessResponse(BaseModel):
    """What process wrote."""

    input_file: ClientPath
    input_files: list[ClientPath]
    output_dir: ClientPath = Field(..., description="Relative to its root; output_root names the root.")
    total: int
    kept: int
    invalid_dropped: int
    duplicates_dropped: int
    duplicates: list[DuplicateRecord] = Field(
        default_factory=list, description="The dropped duplicates (the first data.max_errors_reported)."
    )
    splits: dict[str, SplitFile]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output_root(self) -> str | None:
        """The root holding output_dir: data, model or allowed_roots[i]."""
        return root_role(self.output_dir)


class UploadResponse(BaseModel):
    """Where an uploaded file was stored."""

    file_path: ClientPath = Field(..., description="Relative to the data dir: what the other data routes take.")
    size_bytes: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def root(self) -> str | None:
        """The root holding file_path (data)."""
        return root_role(self.file_path)


class DataFile(BaseModel):
    """A dataset file under the data dir."""

    file_path: str = Field(..., description="Relative to the data dir (what the other data routes take).")
    kind: str = Field(..., description="upload (sent through /api/data/upload) or processed (anything else).")
    size_bytes: int
    records: int = Field(..., description="Records in the file, valid or not.")
    valid_records: int
    format: str | None = Field(None, description="The most common record format (messages, sharegpt, alpaca, ...).")
    formats: dict[str, int]
    modified_at: datetime


class DataFileList(BaseModel):
    """Datasets under the data dir, newest first."""

    items: list[DataFile]
    total: int


class PreviewRecord(BaseModel):
    """One record of a preview: normalised messages, or why it is unusable."""

    line: int
    format: str | None = None
    messages: list[dict[str, str]] | None = None
    error: str | None = None


class PreviewResponse(BaseModel):
    """A page of a dataset's records, normalised."""

    file_path: ClientPath
    offset: int
    limit: int
    items: list[PreviewRecord]
    next_offset: int | None


class DeleteResponse(BaseModel):
    """What DELETE removed."""

    file_path: str
    deleted: bool
    size_bytes: int
