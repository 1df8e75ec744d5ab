"""Health response schema."""

from typing import Any

from pydantic import BaseModel, Field


class HealthOut(BaseModel):
    """What /health reports."""

    status: str = Field(
        description='"ok", or "degraded" while the task store (database) does not answer, a disk is full, or a '
        "task is stalled."
    )
    store: str = Field(description='"ok" or "unavailable": whether the last read of the task store worked.')
    disk: str = Field(
        "ok",
        description='"ok" or "full": a disk that tasks write to (data, models, the task store) is (nearly) full, '
        "or a write failed for lack of space in the last minute.",
    )
    disk_free_mb: dict[str, float] = Field(
        default_factory=dict, description="Free MiB on the disk of the data dir, the model dir and the task store."
    )
    stalled_tasks: int = Field(
        0, description="Running tasks that reported no progress for jobs.stall_seconds (stopped or hung workers)."
    )
    version: str
    uptime_seconds: float
    device: dict[str, Any]
    base_model: str
    jobs: dict[str, int]
    inference: dict[str, int]
