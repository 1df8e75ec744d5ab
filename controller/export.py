"""Export routes: verified ONNX, merged LoRA weights, archives, and archive download."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Body, Response
from fastapi.responses import FileResponse, StreamingResponse

from controller.deps import ExportServiceDep, SettingsDep, StoreDep
from controller.files import opened_file_response
from controller.openapi import error_responses
from controller.tasks import queued_or_finished
from entity import examples
from entity.export import (
    ArchiveExportRequest,
    ExportStarted,
    GgufExportRequest,
    MergedExportRequest,
    OnnxExportRequest,
)
from entity.task import TaskKind, TaskOut, TaskRow

router = APIRouter(prefix="/api/export", tags=["export"])
STARTED = {202: {"model": ExportStarted, "description": "Queued (without wait)."}} | error_responses(
    403, 404, 409, 422, 429
)


async def _answer(
    task: TaskRow, wait: bool, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """202 with the task id, or with `wait` 200 and the finished task (its metrics hold the verification)."""
    jobs = settings.jobs
    final = await queued_or_finished(task, wait, store, jobs.poll_interval, response, jobs.wait_timeout_seconds)
    return ExportStarted(
        task_id=task.id, status=final.status, output_path=task.output_dir or "", task=final if wait else None
    )


@router.post("/onnx", response_model=ExportStarted, status_code=200, summary="Export to ONNX", responses=STARTED)
async def onnx(
    req: Annotated[OnnxExportRequest, Body(openapi_examples=examples.EXPORT_ONNX)],
    service: ExportServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> ExportStarted:
    """Export to ONNX (LoRA merged first) and verify logits against PyTorch in onnxruntime."""
    return await _answer(await asyncio.to_thread(service.onnx, req), req.wait, store, settings, response)


@router.post(
    "/merged", response_model=ExportStarted, status_code=200, summary="Export merged LoRA weights", responses=STARTED
)
async def merged(
    req: Annotated[MergedExportRequest, Body(openapi_examples=examples.EXPORT_MERGED)],
    service: ExportServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> ExportStarted:
    """Merge a LoRA adapter into its base and verify the merged logits equal the adapter model's."""
    return await _answer(await asyncio.to_thread(service.merged, req), req.wait, store, settings, response)


@router.post(
    "/archive", response_model=ExportStarted, status_code=200, summary="Export a tar.gz archive", responses=STARTED
)
async def archive(
    req: Annotated[ArchiveExportRequest, Body(openapi_examples=examples.EXPORT_ARCHIVE)],
    service: ExportServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> ExportStarted:
    """Write a tar.gz of the model or adapter, tokenizer, training args, log and a loading README."""
    return await _answer(await asyncio.to_thread(service.archive, req), req.wait, store, settings, response)


@router.post(
    "/gguf",
    response_model=ExportStarted,
    status_code=200,
    summary="Export a GGUF file (llama.cpp, Ollama)",
    responses=STARTED,
)
async def gguf(
    req: Annotated[GgufExportRequest, Body(openapi_examples=examples.EXPORT_GGUF)],
    service: ExportServiceDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> ExportStarted:
    """Write a GGUF file (f16, bf16 or q8_0) and an Ollama Modelfile; verify logits after loading it back."""
    return await _answer(await asyncio.to_thread(service.gguf, req), req.wait, store, settings, response)


@router.get(
    "/status/{task_id}",
    response_model=TaskOut,
    summary="Get an export's status and verification",
    responses=error_responses(404),
)
def status(task_id: str, store: StoreDep) -> TaskOut:
    """An export task's state (404 for a task of another kind); its metrics hold the verification report."""
    return TaskOut.model_validate(store.get_of_kind(task_id, TaskKind.export))


@router.get(
    "/download/{task_id}",
    response_class=FileResponse,
    summary="Download an archive export",
    responses={200: {"content": {"application/gzip": {}}, "description": "The tar.gz."}} | error_responses(404, 409),
)
def download(task_id: str, service: ExportServiceDep) -> StreamingResponse:
    """Download the tar.gz of a succeeded archive export (refused when it was swapped for a link)."""
    fh, name = service.open_download(task_id)
    return opened_file_response(fh, name, "application/gzip")
