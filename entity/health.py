"""Health response schema."""

from typing import Any

from pydantic import BaseModel, Field


class HealthOut(BaseModel):
    """What /health reports."""

    status: str = Field(description='"ok", or "degraded" while the task store (database) does not answer.')
    store: str = Field(description='"ok" or "unavailable": whether the last read of the task store worked.')
    version: str
    uptime_seconds: float
    device: dict[str, Any]
    base_model: str
    jobs: dict[str, int]
    inference: dict[str, int]
