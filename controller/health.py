"""Health route."""

import asyncio
import logging
import shutil
import time
from pathlib import Path

from fastapi import APIRouter, Request

from controller.deps import RunnerDep, StoreDep
from entity.health import HealthOut
from service.db import STORE_ERRORS, low_space_bytes, sqlite_file, store_error_text
from service.tasks import TaskStore
from util.settings import VERSION, Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
COUNTS_TTL_SECONDS = 1.0  # job counts in /health may be this old; a burst of probes costs one query a second
COUNTS_WAIT_AFTER_SECONDS = 5.0  # counts older than this (nobody polled lately) are re-read before answering


class JobCounts:
    """Task counts per status, re-read from the store (in a thread) at most once per COUNTS_TTL_SECONDS.

    While /health is polled, calls answer from the last counts at once and a stale value starts one refresh in the
    background, so a slow store never holds a probe up. A call after a quiet spell (counts older than
    COUNTS_WAIT_AFTER_SECONDS) waits for a fresh read. A store that does not answer leaves the last counts (zeros
    when there are none) and clears `store_ok`.
    """

    def __init__(self) -> None:
        """Start with nothing read."""
        self.value: dict[str, int] | None = None
        self.stalled = 0  # running tasks silent for jobs.stall_seconds
        self.store_ok = True
        self.read_at = 0.0
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None

    async def _read(self, store: TaskStore) -> None:
        """Read the counts off the event loop (a failed background refresh keeps the last counts)."""
        try:
            self.value, self.stalled = await asyncio.to_thread(lambda: (store.counts(), store.stalled_count()))
            self.store_ok = True
        except STORE_ERRORS as exc:
            log.warning("could not read the job counts of /health: %s", store_error_text(exc))
            self.value = self.value or {}
            self.store_ok = False
        self.read_at = time.monotonic()

    async def get(self, store: TaskStore) -> dict[str, int]:
        """The counts; stale ones are refreshed in the background (one refresh at a time)."""
        if self.value is None or time.monotonic() - self.read_at > COUNTS_WAIT_AFTER_SECONDS:
            async with self._lock:
                if self.value is None or time.monotonic() - self.read_at > COUNTS_WAIT_AFTER_SECONDS:
                    await self._read(store)
        elif time.monotonic() - self.read_at > COUNTS_TTL_SECONDS and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._read(store))
        assert self.value is not None
        return self.value


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (a folder not made yet lives on its parent's disk)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def disk_state(settings: Settings, store: TaskStore) -> tuple[str, dict[str, float]]:
    """The disk's state ("full" or "ok") and free MiB where tasks write: data dir, model dir, the SQLite store's.

    Full: a folder's disk has less than low_space_bytes free, the store's reserve was spent and cannot be made
    again, or this server met a full disk (a write it or a worker of it could not make) in the last minute.
    """
    folders = {"data": settings.data_dir, "models": settings.model_dir}
    db_file = sqlite_file(store.engine)
    if db_file is not None:
        folders["store"] = db_file.parent
    full = store.disk_full_recently()
    free: dict[str, float] = {}
    for role, folder in folders.items():
        try:
            where = _existing(folder)
            usage = shutil.disk_usage(where)
        except OSError:
            continue
        free[role] = round(usage.free / 2**20, 1)
        if usage.free < low_space_bytes(where):
            full = True
    if not store.reserve.ensure():
        full = True
    return ("full" if full else "ok"), free


@router.get("/health", response_model=HealthOut, summary="Service health")
async def health(request: Request, store: StoreDep, runner: RunnerDep) -> HealthOut:
    """Service status, version, uptime, device, job counts and inference counters (cheap: safe to poll often)."""
    state = request.app.state
    if not hasattr(state, "job_counts"):
        state.job_counts = JobCounts()
    counts = await state.job_counts.get(store)
    disk, disk_free = await asyncio.to_thread(disk_state, state.settings, store)
    stalled = state.job_counts.stalled
    ok = state.job_counts.store_ok and disk == "ok" and not stalled
    return HealthOut(
        status="ok" if ok else "degraded",
        store="ok" if state.job_counts.store_ok else "unavailable",
        disk=disk,
        disk_free_mb=disk_free,
        stalled_tasks=stalled,
        version=VERSION,
        uptime_seconds=round(time.monotonic() - state.started, 1),
        device=state.device,
        base_model=state.settings.models.base_model,
        jobs={
            "active": counts.get("running", 0),
            "queued": counts.get("queued", 0),
            "total": counts.get("total", 0),
            # Ray: the cluster's size (asks Ray at most every few seconds, off the event loop)
            "slots": runner.slots if runner.backend is None else await asyncio.to_thread(runner.capacity),
        },
        inference={
            **state.inference_service.stats,
            "cached_models": len(state.model_cache.keys()),
            "model_loads": state.model_cache.loads,
        },
    )
