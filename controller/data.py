"""Data routes: validate, process (normalise + split), and upload."""

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Query, Request
from starlette.concurrency import run_in_threadpool

from controller.deps import DataServiceDep
from controller.openapi import error_responses
from controller.uploads import form_bool, multipart_body, stream_upload
from entity import examples
from entity.data import (
    DataFileList,
    DeleteResponse,
    PreviewResponse,
    ProcessRequest,
    ProcessResponse,
    UploadResponse,
    ValidateRequest,
    ValidateResponse,
)
from service.data import UploadWriter
from util.errors import InvalidInputError

router = APIRouter(prefix="/api/data", tags=["data"])


@router.post(
    "/validate",
    response_model=ValidateResponse,
    summary="Validate a dataset",
    responses=error_responses(403, 404, 422),
)
def validate(
    service: DataServiceDep,
    file_path: Annotated[str | None, Query(description="Alternative to the JSON body's file_path.")] = None,
    max_length: Annotated[int | None, Query(ge=1)] = None,
    body: Annotated[ValidateRequest | None, Body(openapi_examples=examples.VALIDATE)] = None,
) -> ValidateResponse:
    """Check a chat dataset's records and measure their token lengths."""
    body = body or ValidateRequest()
    path = body.file_path or file_path
    if not path:
        raise InvalidInputError("Give file_path as a query parameter or in the JSON body.")
    return service.validate(path, body.max_length or max_length, body.model)


@router.post(
    "/process",
    response_model=ProcessResponse,
    summary="Normalise and split a dataset",
    responses=error_responses(403, 404, 409, 422),
)
def process(
    req: Annotated[ProcessRequest, Body(openapi_examples=examples.PROCESS)], service: DataServiceDep
) -> ProcessResponse:
    """Normalise one or several datasets (merged, deduplicated) to messages JSONL and split into train/val/test."""
    return service.process(req)


@router.post(
    "/upload",
    response_model=UploadResponse,
    status_code=201,
    summary="Upload a dataset",
    responses=error_responses(409, 413, 422),
    openapi_extra=multipart_body(
        "A JSON or JSONL dataset.", {"overwrite": {"type": "boolean", "title": "Overwrite", "default": False}}, []
    ),
)
async def upload(request: Request, service: DataServiceDep) -> UploadResponse:
    """Store an uploaded dataset under the data dir's uploads/ folder (streamed there; 413 past the size limit)."""

    def open_file(filename: str, fields: dict[str, str]) -> UploadWriter:
        return service.begin_upload(filename, form_bool(fields, "overwrite") if "overwrite" in fields else None)

    upload = await stream_upload(request, open_file)
    try:
        overwrite = form_bool(upload.fields, "overwrite")
    except BaseException:
        await run_in_threadpool(upload.file.discard)
        raise
    return await run_in_threadpool(service.finish_upload, upload.file, overwrite)


@router.get("/files", response_model=DataFileList, summary="List dataset files")
def files(
    service: DataServiceDep, kind: Annotated[Literal["upload", "processed"] | None, Query()] = None
) -> DataFileList:
    """Uploaded and processed datasets under the data dir: size, record count and format."""
    return service.list_files(kind)


@router.get(
    "/preview",
    response_model=PreviewResponse,
    summary="Preview dataset records",
    responses=error_responses(403, 404, 422),
)
def preview(
    service: DataServiceDep,
    file_path: Annotated[str, Query(description="Relative to the data dir, or absolute inside an allowed root.")],
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> PreviewResponse:
    """A page of a dataset's records, normalised to messages (unusable ones with the reason)."""
    return service.preview(file_path, offset, limit)


@router.delete(
    "/files",
    response_model=DeleteResponse,
    summary="Delete an uploaded dataset",
    responses=error_responses(403, 404, 409, 422),
)
def delete_upload(
    service: DataServiceDep,
    file_path: Annotated[str, Query(description="An uploaded file: uploads/<name> or <name>.")],
) -> DeleteResponse:
    """Delete an uploaded dataset (only one sent through /api/data/upload, and none an active task reads)."""
    return service.delete_upload(file_path)
