"""Schemas of the task output-file API and the dataset listing/preview API."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class FileEntry(BaseModel):
    """One file: its path relative to the folder listed, size and modification time."""

    path: str
    size_bytes: int
    modified_at: datetime


class TaskFileList(BaseModel):
    """The files a task wrote into its output folder."""

    task_id: str
    output_dir: str
    items: list[FileEntry]
    truncated: bool


class DatasetFileList(BaseModel):
    """JSON and JSONL files under the data dir (paths relative to it)."""

    data_dir: str
    items: list[FileEntry]
    truncated: bool


class PreviewRecord(BaseModel):
    """One record of a dataset: its messages once normalised, or why it is unusable."""

    line: int
    format: str | None
    messages: list[dict[str, str]] | None
    raw: Any = None
    error: str | None


class DatasetPreview(BaseModel):
    """A window of a dataset's records."""

    file_path: str
    offset: int
    items: list[PreviewRecord]
    has_more: bool
