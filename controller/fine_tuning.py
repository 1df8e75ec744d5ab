"""OpenAI fine-tuning routes: /v1/files, /v1/fine_tuning/jobs (+ events, checkpoints, pause) and /v1/models/{id}."""

from typing import Annotated, Literal

from fastapi import APIRouter, Body, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from openai.types import FileDeleted, FileObject, Model, ModelDeleted

from controller.deps import FileServiceDep, FineTuningServiceDep, InferenceServiceDep
from entity import examples
from entity.fine_tuning import CheckpointList, FileList, FineTuningJobOut, JobCreateRequest, JobEventList, JobList
from util.errors import NotFoundError

router = APIRouter(prefix="/v1", tags=["openai fine-tuning"])

After = Annotated[str | None, Query(description="Cursor: the id of the last object of the previous page.")]


@router.post("/files", response_model=FileObject)
def create_file(
    files: FileServiceDep,
    file: Annotated[UploadFile, File(description="JSONL: chat records, or preference records for DPO.")],
    purpose: Annotated[str, Form(description="Only 'fine-tune'.")],
) -> FileObject:
    """Upload a training file; every record is validated, and a bad one answers 400 with its line and reason."""
    return files.create(file.filename or "", purpose, file.file)


@router.get("/files", response_model=FileList)
def list_files(
    files: FileServiceDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> FileList:
    """Stored files, newest first by default, with cursor pagination."""
    data, more = files.page(after, limit, order, purpose)
    return FileList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, files: FileServiceDep) -> FileObject:
    """One file's metadata."""
    return files.get(file_id)


@router.get("/files/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, files: FileServiceDep) -> FileResponse:
    """A file's bytes as uploaded (or a job's results CSV)."""
    path, name = files.content_path(file_id)
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, files: FileServiceDep) -> FileDeleted:
    """Delete a file that no unfinished job trains on."""
    return files.delete(file_id)


@router.post("/fine_tuning/jobs", response_model=FineTuningJobOut)
def create_job(
    req: Annotated[JobCreateRequest, Body(openapi_examples=examples.FINE_TUNING_JOB)], service: FineTuningServiceDep
) -> FineTuningJobOut:
    """Queue a fine-tuning job: a LoRA train task (supervised, or DPO on preference files)."""
    return service.create(req)


@router.get("/fine_tuning/jobs", response_model=JobList)
def list_jobs(
    request: Request,
    service: FineTuningServiceDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JobList:
    """Jobs newest first, with cursor pagination; filter with metadata[key]=value."""
    params = request.query_params.items()
    metadata = {k[len("metadata[") : -1]: v for k, v in params if k.startswith("metadata[") and k.endswith("]")}
    data, more = service.page(after, limit, metadata)
    return JobList(data=data, has_more=more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJobOut)
def retrieve_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """One job."""
    return service.get(job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobOut)
def cancel_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Cancel a queued, running or paused job (409 once it has finished)."""
    return service.cancel(job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJobOut)
def pause_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Pause a job: it saves a checkpoint at its next step and frees its slot (and GPU)."""
    return service.pause(job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJobOut)
def resume_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Queue a paused job again; it continues from its last checkpoint."""
    return service.resume(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=JobEventList)
def job_events(
    job_id: str,
    service: FineTuningServiceDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JobEventList:
    """A job's events newest first: messages, and metrics (type metrics, the step's values in data)."""
    data, more = service.events(job_id, after, limit)
    return JobEventList(data=data, has_more=more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def job_checkpoints(
    job_id: str,
    service: FineTuningServiceDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> CheckpointList:
    """A job's saved checkpoints newest first; each is usable as a model by its fine_tuned_model_checkpoint."""
    data, more = service.checkpoints(job_id, after, limit)
    return CheckpointList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/models/{model_id}", response_model=Model)
def retrieve_model(model_id: str, service: FineTuningServiceDep, inference: InferenceServiceDep) -> Model:
    """One model a request can name (base, fine-tuned, or a succeeded train task's id)."""
    for entry in service.model_list(inference.served_models()):
        if entry.id == model_id:
            return entry
    raise NotFoundError(f"Model '{model_id}' was not found.", details={"model": model_id})


@router.delete("/models/{model_id}", response_model=ModelDeleted)
def delete_model(model_id: str, service: FineTuningServiceDep, inference: InferenceServiceDep) -> ModelDeleted:
    """Delete a fine-tuned model's weights (base models are refused with 403)."""
    return service.delete_model(model_id, inference.served_models())
