"""Typed results of the SDK."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def _time(value: str | None) -> datetime | None:
    """Parse an ISO timestamp from the server."""
    return datetime.fromisoformat(value) if value else None


@dataclass
class Job:
    """A task on the server: training, evaluation or export."""

    id: str
    kind: str
    status: str
    progress: float = 0.0
    current_step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eta_seconds: float | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    output_dir: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> "Job":
        """Build from the server's task JSON."""
        return cls(
            id=data["id"],
            kind=data.get("kind", ""),
            status=data["status"],
            progress=data.get("progress") or 0.0,
            current_step=data.get("current_step") or 0,
            total_steps=data.get("total_steps"),
            epoch=data.get("epoch"),
            loss=data.get("loss"),
            eta_seconds=data.get("eta_seconds"),
            metrics=data.get("metrics"),
            error=data.get("error"),
            output_dir=data.get("output_dir"),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            raw=data,
        )

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish (or until now while running)."""
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(self.started_at.tzinfo)
        return (end - self.started_at).total_seconds()

    @property
    def fine_tuned_model(self) -> str | None:
        """The name to chat with: a succeeded training job's id."""
        return self.id if self.kind == "train" and self.is_successful else None

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended."""
        return self.status in TERMINAL

    @property
    def is_successful(self) -> bool:
        """Whether the job succeeded."""
        return self.status == "succeeded"

    @property
    def is_failed(self) -> bool:
        """Whether the job failed or was cancelled."""
        return self.status in ("failed", "cancelled")

    @property
    def data_stats(self) -> dict[str, Any] | None:
        """A training job's data statistics: records processed/truncated/skipped/failed and length stats."""
        return (self.metrics or {}).get("data_stats")

    @property
    def stages(self) -> list[dict[str, Any]] | None:
        """Per-stage reports of a finished multi-stage training job."""
        return (self.metrics or {}).get("stages")

    @property
    def resume_count(self) -> int:
        """How many times the server resumed this training job from a checkpoint after a restart."""
        resolved = (self.raw.get("request") or {}).get("resolved") or {}
        return int(resolved.get("resume_count") or 0)
