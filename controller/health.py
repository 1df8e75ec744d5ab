"""Health route."""

import asyncio
import time

from fastapi import APIRouter, Request

from controller.deps import RunnerDep, StoreDep
from entity.health import HealthOut
from service.tasks import TaskStore
from util.settings import VERSION

router = APIRouter(tags=["health"])
COUNTS_TTL_SECONDS = 1.0  # job counts in /health may be this old; a burst of probes costs one query a second


class JobCounts:
    """Task counts per status, re-read from the store (in a thread) at most once per COUNTS_TTL_SECONDS."""

    def __init__(self) -> None:
        """Start with nothing read."""
        self.value: dict[str, int] | None = None
        self.read_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, store: TaskStore) -> dict[str, int]:
        """The counts, refreshed when stale; concurrent callers share one refresh."""
        if self.value is None or time.monotonic() - self.read_at > COUNTS_TTL_SECONDS:
            async with self._lock:
                if self.value is None or time.monotonic() - self.read_at > COUNTS_TTL_SECONDS:
                    self.value = await asyncio.to_thread(store.counts)
                    self.read_at = time.monotonic()
        return self.value


@router.get("/health", response_model=HealthOut, summary="Service health")
async def health(request: Request, store: StoreDep, runner: RunnerDep) -> HealthOut:
    """Service status, version, uptime, device, job counts and inference counters (cheap: safe to poll often)."""
    state = request.app.state
    if not hasattr(state, "job_counts"):
        state.job_counts = JobCounts()
    counts = await state.job_counts.get(store)
    return HealthOut(
        status="ok",
        version=VERSION,
        uptime_seconds=round(time.monotonic() - state.started, 1),
        device=state.device,
        base_model=state.settings.models.base_model,
        jobs={
            "active": counts["running"],
            "queued": counts["queued"],
            "total": counts["total"],
            "slots": runner.slots,
        },
        inference={
            **state.inference_service.stats,
            "cached_models": len(state.model_cache.keys()),
            "model_loads": state.model_cache.loads,
        },
    )
