"""Schemas of the task output-file API."""

from datetime import datetime

from pydantic import BaseModel, Field

from entity.paths import ClientPath


class FileEntry(BaseModel):
    """One file: its path relative to the folder listed, size and modification time."""

    path: str
    size_bytes: int
    modified_at: datetime


class TaskFileList(BaseModel):
    """The files a task wrote into its output folder."""

    task_id: str
    output_dir: ClientPath = Field(..., description="Relative to its root (the model dir for a train task).")
    items: list[FileEntry]
    truncated: bool
