"""Health response schema."""

from typing import Any

from pydantic import BaseModel


class HealthOut(BaseModel):
    """What /health reports."""

    status: str
    version: str
    uptime_seconds: float
    device: dict[str, Any]
    base_model: str
    jobs: dict[str, int]
    inference: dict[str, int]
