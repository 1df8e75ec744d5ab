"""OpenAI fine-tuning routes: /v1/files, /v1/fine_tuning/jobs (+ events, checkpoints, pause) and /v1/models/{id}."""

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from openai.types import FileDeleted, FileObject, Model, ModelDeleted
from starlette.concurrency import run_in_threadpool

from controller.deps import FileServiceDep, FineTuningServiceDep, InferenceServiceDep
from controller.files import opened_file_response
from controller.openapi import error_responses
from controller.uploads import multipart_body, stream_upload
from entity import examples
from entity.fine_tuning import CheckpointList, FileList, FineTuningJobOut, JobCreateRequest, JobEventList, JobList
from util.errors import NotFoundError

router = APIRouter(prefix="/v1", tags=["openai fine-tuning"])

After = Annotated[str | None, Query(description="Cursor: the id of the last object of the previous page.")]


@router.post(
    "/files",
    response_model=FileObject,
    responses=error_responses(400, 413, 422),
    openapi_extra=multipart_body(
        "JSONL: chat records, or preference records for DPO.",
        {"purpose": {"type": "string", "title": "Purpose", "description": "Only 'fine-tune'."}},
        ["purpose"],
    ),
)
async def create_file(request: Request, files: FileServiceDep) -> FileObject:
    """Upload a training file; every record is validated, and a bad one answers 400 with its line and reason."""
    upload = await stream_upload(request, lambda name, fields: files.begin(name, fields.get("purpose")), ("purpose",))
    return await run_in_threadpool(files.finish, upload.file, upload.filename, upload.fields["purpose"])


@router.get("/files", response_model=FileList, responses=error_responses(404))
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
def file_content(file_id: str, files: FileServiceDep) -> StreamingResponse:
    """A file's bytes as uploaded (or a job's results CSV); never through a link swapped in for the stored file."""
    fh, name = files.open_content(file_id)
    return opened_file_response(fh, name, "application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409))
def delete_file(file_id: str, files: FileServiceDep) -> FileDeleted:
    """Delete a file that no unfinished job trains on."""
    return files.delete(file_id)


@router.post("/fine_tuning/jobs", response_model=FineTuningJobOut, responses=error_responses(400, 404, 409, 429))
def create_job(
    req: Annotated[JobCreateRequest, Body(openapi_examples=examples.FINE_TUNING_JOB)], service: FineTuningServiceDep
) -> FineTuningJobOut:
    """Queue a fine-tuning job: a LoRA train task (supervised, or DPO on preference files)."""
    return service.create(req)


@router.get("/fine_tuning/jobs", response_model=JobList, responses=error_responses(400, 404))
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


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobOut, responses=error_responses(404, 409))
def cancel_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Cancel a queued, running or paused job (409 once it has finished)."""
    return service.cancel(job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJobOut, responses=error_responses(404, 409))
def pause_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Pause a job: it saves a checkpoint at its next step and frees its slot (and GPU)."""
    return service.pause(job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJobOut, responses=error_responses(404, 409))
def resume_job(job_id: str, service: FineTuningServiceDep) -> FineTuningJobOut:
    """Queue a paused job again; it continues from its last checkpoint."""
    return service.resume(job_id)


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=JobEventList, responses=error_responses(400, 404))
def job_events(
    job_id: str,
    service: FineTuningServiceDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JobEventList:
    """A job's events newest first: messages, and metrics (type metrics, the step's values in data)."""
    data, more = service.events(job_id, after, limit)
    return JobEventList(data=data, has_more=more)


@router.get(
    "/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList, responses=error_responses(400, 404)
)
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


@router.delete("/models/{model_id}", response_model=ModelDeleted, responses=error_responses(403, 404, 409))
def delete_model(model_id: str, service: FineTuningServiceDep, inference: InferenceServiceDep) -> ModelDeleted:
    """Delete a fine-tuned model's weights (base models are refused with 403)."""
    return service.delete_model(model_id, inference.served_models())
