"""Task output files: list them and download one (inside the task's folder only)."""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from controller.deps import OutputFileServiceDep
from entity.files import TaskFileList

router = APIRouter(prefix="/api/tasks", tags=["tasks"])


@router.get("/{task_id}/files", response_model=TaskFileList)
def list_files(task_id: str, service: OutputFileServiceDep) -> TaskFileList:
    """List the files a task wrote (model, adapter, logs, results), relative to its output folder."""
    return service.list(task_id)


@router.get("/{task_id}/files/{path:path}", response_class=FileResponse)
def download(task_id: str, path: str, service: OutputFileServiceDep) -> FileResponse:
    """Download one of a task's output files; paths that leave its folder are refused."""
    target = service.path(task_id, path)
    return FileResponse(target, filename=target.name)
