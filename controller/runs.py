"""Low-level training API (/v1/runs, /v1/jobs): runs hold a model + LoRA; primitives are ordered jobs."""

from typing import Annotated

from fastapi import APIRouter, Query

from controller.deps import RunServiceDep
from entity.runs import (
    CheckpointList,
    CheckpointOut,
    CreateRunRequest,
    ForwardBackwardRequest,
    JobOut,
    JobQueued,
    LoadStateRequest,
    OptimStepRequest,
    RunJobRow,
    RunList,
    RunOut,
    SampleRequest,
    SaveStateRequest,
)

router = APIRouter(prefix="/v1", tags=["runs"])


def _queued(job: RunJobRow) -> JobQueued:
    """The immediate answer of a primitive."""
    return JobQueued(job_id=job.id, run_id=job.run_id, kind=job.kind, status=job.status)


@router.post("/runs", response_model=RunOut, status_code=201)
def create_run(req: CreateRunRequest, service: RunServiceDep) -> RunOut:
    """Start a run: a worker loads the base model and a fresh LoRA (or a saved state) and keeps them."""
    return RunOut.model_validate(service.create(req))


@router.get("/runs", response_model=RunList)
def list_runs(service: RunServiceDep) -> RunList:
    """Every run, newest first (kept across restarts)."""
    return RunList(items=[RunOut.model_validate(r) for r in service.store.runs()])


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(run_id: str, service: RunServiceDep) -> RunOut:
    """One run."""
    return RunOut.model_validate(service.store.get_run(run_id))


@router.delete("/runs/{run_id}", response_model=RunOut)
def delete_run(run_id: str, service: RunServiceDep) -> RunOut:
    """Free a run's worker and memory; its saved states stay."""
    return RunOut.model_validate(service.delete(run_id))


@router.post("/runs/{run_id}/forward_backward", response_model=JobQueued, status_code=202)
def forward_backward(run_id: str, req: ForwardBackwardRequest, service: RunServiceDep) -> JobQueued:
    """Accumulate gradients of the weighted cross-entropy over the examples."""
    return _queued(service.forward_backward(run_id, req))


@router.post("/runs/{run_id}/optim_step", response_model=JobQueued, status_code=202)
def optim_step(run_id: str, req: OptimStepRequest, service: RunServiceDep) -> JobQueued:
    """Apply an AdamW step to the accumulated gradients."""
    return _queued(service.optim_step(run_id, req))


@router.post("/runs/{run_id}/sample", response_model=JobQueued, status_code=202)
def sample(run_id: str, req: SampleRequest, service: RunServiceDep) -> JobQueued:
    """Sample with the run's current weights (texts, tokens, logprobs)."""
    return _queued(service.sample(run_id, req))


@router.post("/runs/{run_id}/save_state", response_model=JobQueued, status_code=202)
def save_state(run_id: str, req: SaveStateRequest, service: RunServiceDep) -> JobQueued:
    """Save the adapter and optimizer state; the folder can be served, evaluated and exported."""
    return _queued(service.save_state(run_id, req))


@router.post("/runs/{run_id}/load_state", response_model=JobQueued, status_code=202)
def load_state(run_id: str, req: LoadStateRequest, service: RunServiceDep) -> JobQueued:
    """Load a saved adapter (and optimizer state) into the run."""
    return _queued(service.load_state(run_id, req))


@router.get("/runs/{run_id}/checkpoints", response_model=CheckpointList)
def run_checkpoints(run_id: str, service: RunServiceDep) -> CheckpointList:
    """A run's saved states."""
    service.store.get_run(run_id)
    return CheckpointList(items=[CheckpointOut.model_validate(c) for c in service.store.checkpoints(run_id)])


@router.get("/checkpoints", response_model=CheckpointList)
def checkpoints(service: RunServiceDep, run_id: str | None = None) -> CheckpointList:
    """Saved states of every run (or one)."""
    return CheckpointList(items=[CheckpointOut.model_validate(c) for c in service.store.checkpoints(run_id)])


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str,
    service: RunServiceDep,
    wait: bool = False,
    timeout: Annotated[float, Query(gt=0, le=600, description="Longest wait with wait=true (s).")] = 60.0,
) -> JobOut:
    """A job's status and result; with wait=true, long-poll until it completes or fails."""
    job = await service.wait_job(job_id, timeout) if wait else service.store.get_job(job_id)
    return JobOut.model_validate(job)
