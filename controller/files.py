"""Task output files: list them and download one (inside the task's folder only)."""

import os
from collections.abc import Iterator
from mimetypes import guess_type
from typing import BinaryIO
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import FileResponse, StreamingResponse

from controller.deps import OutputFileServiceDep
from controller.openapi import error_responses
from entity.files import TaskFileList

router = APIRouter(prefix="/api/tasks", tags=["tasks"])
CHUNK_BYTES = 1 << 20


def opened_file_response(fh: BinaryIO, filename: str, media_type: str | None = None) -> StreamingResponse:
    """Serve a file opened already (util.files.open_stored: never through a link) as an attachment.

    FileResponse would open the path again when it sends, after any check; this sends the bytes of the file that
    was opened, up to its size at opening (a file still growing, such as a training log, stays consistent).
    """
    size = os.fstat(fh.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with fh:
            left = size
            while left > 0 and (chunk := fh.read(min(CHUNK_BYTES, left))):
                left -= len(chunk)
                yield chunk

    quoted = quote(filename)
    disposition = (
        f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'
    )
    return StreamingResponse(
        chunks(),
        media_type=media_type or guess_type(filename)[0] or "application/octet-stream",
        headers={"content-length": str(size), "content-disposition": disposition},
    )


@router.get(
    "/{task_id}/files",
    response_model=TaskFileList,
    summary="List a task's output files",
    responses=error_responses(403, 404),
)
def list_files(task_id: str, service: OutputFileServiceDep) -> TaskFileList:
    """List the files a task wrote (model, adapter, logs, results), relative to its output folder."""
    return service.list(task_id)


@router.get(
    "/{task_id}/files/{path:path}",
    response_class=FileResponse,
    summary="Download a task's output file",
    responses=error_responses(403, 404),
)
def download(task_id: str, path: str, service: OutputFileServiceDep) -> StreamingResponse:
    """Download one of a task's output files; paths that leave its folder, or lead through a link, are refused."""
    fh, name = service.open(task_id, path)
    return opened_file_response(fh, name)
