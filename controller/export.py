"""Export routes: verified ONNX, merged LoRA weights, archives, and archive download."""

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from controller.deps import ExportServiceDep, SettingsDep, StoreDep
from controller.tasks import queued_or_finished
from entity.export import (
    ArchiveExportRequest,
    ExportStarted,
    GgufExportRequest,
    MergedExportRequest,
    OnnxExportRequest,
)
from entity.task import TaskOut, TaskRow

router = APIRouter(prefix="/api/export", tags=["export"])


async def _answer(
    task: TaskRow, wait: bool, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """202 with the task id, or with `wait` 200 and the finished task (its metrics hold the verification)."""
    final = await queued_or_finished(task, wait, store, settings.jobs.poll_interval, response)
    return ExportStarted(
        task_id=task.id, status=final.status, output_path=task.output_dir or "", task=final if wait else None
    )


@router.post("/onnx", response_model=ExportStarted, status_code=200)
async def onnx(
    req: OnnxExportRequest, service: ExportServiceDep, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """Export to ONNX (LoRA merged first) and verify logits against PyTorch in onnxruntime."""
    return await _answer(service.onnx(req), req.wait, store, settings, response)


@router.post("/merged", response_model=ExportStarted, status_code=200)
async def merged(
    req: MergedExportRequest, service: ExportServiceDep, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """Merge a LoRA adapter into its base and verify the merged logits equal the adapter model's."""
    return await _answer(service.merged(req), req.wait, store, settings, response)


@router.post("/archive", response_model=ExportStarted, status_code=200)
async def archive(
    req: ArchiveExportRequest, service: ExportServiceDep, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """Write a tar.gz of the model or adapter, tokenizer, training args, log and a loading README."""
    return await _answer(service.archive(req), req.wait, store, settings, response)


@router.post("/gguf", response_model=ExportStarted, status_code=200)
async def gguf(
    req: GgufExportRequest, service: ExportServiceDep, store: StoreDep, settings: SettingsDep, response: Response
) -> ExportStarted:
    """Write a GGUF file (f16, bf16 or q8_0) and an Ollama Modelfile; verify logits after loading it back."""
    return await _answer(service.gguf(req), req.wait, store, settings, response)


@router.get("/status/{task_id}", response_model=TaskOut)
def status(task_id: str, store: StoreDep) -> TaskOut:
    """An export task's state; its metrics hold the verification report once it has finished."""
    return TaskOut.model_validate(store.get(task_id))


@router.get("/download/{task_id}", response_class=FileResponse)
def download(task_id: str, service: ExportServiceDep) -> FileResponse:
    """Download the tar.gz of a succeeded archive export."""
    path = service.download_path(task_id)
    return FileResponse(path, media_type="application/gzip", filename=path.name)
