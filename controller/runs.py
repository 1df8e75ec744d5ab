"""Low-level training API (/v1/runs, /v1/jobs): runs hold a model + LoRA; primitives are ordered jobs."""

from typing import Annotated

from fastapi import APIRouter, Body, Query

from controller.deps import RunServiceDep
from controller.openapi import error_responses
from entity import examples
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


@router.post(
    "/runs",
    response_model=RunOut,
    status_code=201,
    summary="Create a run",
    responses=error_responses(403, 404, 409, 422, 429),
)
def create_run(
    req: Annotated[CreateRunRequest, Body(openapi_examples=examples.CREATE_RUN)], service: RunServiceDep
) -> RunOut:
    """Start a run: a worker loads the base model and a fresh LoRA (or a saved state) and keeps them."""
    return RunOut.model_validate(service.create(req))


@router.get("/runs", response_model=RunList, summary="List runs")
def list_runs(service: RunServiceDep) -> RunList:
    """Every run, newest first (kept across restarts)."""
    return RunList(items=[RunOut.model_validate(r) for r in service.store.runs()])


@router.get("/runs/{run_id}", response_model=RunOut, summary="Get a run", responses=error_responses(404))
def get_run(run_id: str, service: RunServiceDep) -> RunOut:
    """One run."""
    return RunOut.model_validate(service.store.get_run(run_id))


@router.delete("/runs/{run_id}", response_model=RunOut, summary="Delete a run", responses=error_responses(404, 409))
def delete_run(run_id: str, service: RunServiceDep) -> RunOut:
    """Free a run's worker and memory; its saved states stay."""
    return RunOut.model_validate(service.delete(run_id))


@router.post(
    "/runs/{run_id}/forward_backward",
    response_model=JobQueued,
    status_code=202,
    summary="Queue a forward-backward pass",
    responses=error_responses(404, 409, 422, 429),
)
def forward_backward(
    run_id: str,
    req: Annotated[ForwardBackwardRequest, Body(openapi_examples=examples.FORWARD_BACKWARD)],
    service: RunServiceDep,
) -> JobQueued:
    """Accumulate gradients of the weighted cross-entropy over the examples."""
    return _queued(service.forward_backward(run_id, req))


@router.post(
    "/runs/{run_id}/optim_step",
    response_model=JobQueued,
    status_code=202,
    summary="Queue an optimizer step",
    responses=error_responses(404, 409, 422, 429),
)
def optim_step(
    run_id: str, req: Annotated[OptimStepRequest, Body(openapi_examples=examples.OPTIM_STEP)], service: RunServiceDep
) -> JobQueued:
    """Apply an AdamW step to the accumulated gradients."""
    return _queued(service.optim_step(run_id, req))


@router.post(
    "/runs/{run_id}/sample",
    response_model=JobQueued,
    status_code=202,
    summary="Queue sampling",
    responses=error_responses(404, 409, 422, 429),
)
def sample(
    run_id: str, req: Annotated[SampleRequest, Body(openapi_examples=examples.SAMPLE)], service: RunServiceDep
) -> JobQueued:
    """Sample with the run's current weights (texts, tokens, logprobs)."""
    return _queued(service.sample(run_id, req))


@router.post(
    "/runs/{run_id}/save_state",
    response_model=JobQueued,
    status_code=202,
    summary="Queue saving the run's state",
    responses=error_responses(404, 409, 422, 429),
)
def save_state(
    run_id: str, req: Annotated[SaveStateRequest, Body(openapi_examples=examples.SAVE_STATE)], service: RunServiceDep
) -> JobQueued:
    """Save the adapter and optimizer state; the folder can be served, evaluated and exported."""
    return _queued(service.save_state(run_id, req))


@router.post(
    "/runs/{run_id}/load_state",
    response_model=JobQueued,
    status_code=202,
    summary="Queue loading a saved state",
    responses=error_responses(403, 404, 409, 422, 429),
)
def load_state(
    run_id: str, req: Annotated[LoadStateRequest, Body(openapi_examples=examples.LOAD_STATE)], service: RunServiceDep
) -> JobQueued:
    """Load a saved adapter (and optimizer state) into the run."""
    return _queued(service.load_state(run_id, req))


@router.get(
    "/runs/{run_id}/checkpoints",
    response_model=CheckpointList,
    summary="List a run's saved states",
    responses=error_responses(404),
)
def run_checkpoints(run_id: str, service: RunServiceDep) -> CheckpointList:
    """A run's saved states."""
    service.store.get_run(run_id)
    return CheckpointList(items=[CheckpointOut.model_validate(c) for c in service.store.checkpoints(run_id)])


@router.get("/checkpoints", response_model=CheckpointList, summary="List saved states", responses=error_responses(422))
def checkpoints(service: RunServiceDep, run_id: str | None = None) -> CheckpointList:
    """Saved states of every run (or one)."""
    return CheckpointList(items=[CheckpointOut.model_validate(c) for c in service.store.checkpoints(run_id)])


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job", responses=error_responses(404, 422))
async def get_job(
    job_id: str,
    service: RunServiceDep,
    wait: bool = False,
    timeout: Annotated[float, Query(gt=0, le=600, description="Longest wait with wait=true (s).")] = 60.0,
) -> JobOut:
    """A job's status and result; with wait=true, long-poll until it completes or fails."""
    job = await service.wait_job(job_id, timeout) if wait else service.store.get_job(job_id)
    return JobOut.model_validate(job)
