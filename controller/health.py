"""Health route."""

import time

from fastapi import APIRouter, Request

from controller.deps import RunnerDep, StoreDep
from entity.health import HealthOut
from util.settings import VERSION

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut, summary="Service health")
def health(request: Request, store: StoreDep, runner: RunnerDep) -> HealthOut:
    """Service status, version, uptime, device, job counts and inference counters."""
    counts = store.counts()
    return HealthOut(
        status="ok",
        version=VERSION,
        uptime_seconds=round(time.monotonic() - request.app.state.started, 1),
        device=request.app.state.device,
        base_model=request.app.state.settings.models.base_model,
        jobs={
            "active": counts["running"],
            "queued": counts["queued"],
            "total": counts["total"],
            "slots": runner.slots,
        },
        inference={
            **request.app.state.inference_service.stats,
            "cached_models": len(request.app.state.model_cache.keys()),
            "model_loads": request.app.state.model_cache.loads,
        },
    )
