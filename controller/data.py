"""Data routes: validate, process (normalise + split), and upload."""

from typing import Annotated

from fastapi import APIRouter, Body, File, Form, Query, UploadFile

from controller.deps import DataServiceDep
from entity.data import ProcessRequest, ProcessResponse, UploadResponse, ValidateRequest, ValidateResponse
from entity.files import DatasetFileList, DatasetPreview
from util.errors import InvalidInputError

router = APIRouter(prefix="/api/data", tags=["data"])


@router.post("/validate", response_model=ValidateResponse)
def validate(
    service: DataServiceDep,
    file_path: Annotated[str | None, Query(description="Alternative to the JSON body's file_path.")] = None,
    max_length: Annotated[int | None, Query(ge=1)] = None,
    body: Annotated[ValidateRequest | None, Body()] = None,
) -> ValidateResponse:
    """Check a chat dataset's records and measure their token lengths."""
    body = body or ValidateRequest()
    path = body.file_path or file_path
    if not path:
        raise InvalidInputError("Give file_path as a query parameter or in the JSON body.")
    return service.validate(path, body.max_length or max_length, body.model)


@router.post("/process", response_model=ProcessResponse)
def process(req: ProcessRequest, service: DataServiceDep) -> ProcessResponse:
    """Normalise a dataset to messages JSONL and split it into train/val/test."""
    return service.process(req)


@router.post("/upload", response_model=UploadResponse, status_code=201)
def upload(
    service: DataServiceDep,
    file: Annotated[UploadFile, File(description="A JSON or JSONL dataset.")],
    overwrite: Annotated[bool, Form()] = False,
) -> UploadResponse:
    """Store an uploaded dataset under the data dir's uploads/ folder."""
    return service.upload(file.filename or "", file.file, overwrite=overwrite)


@router.get("/files", response_model=DatasetFileList, summary="List dataset files")
def files(service: DataServiceDep) -> DatasetFileList:
    """List the JSON and JSONL files under the data dir (uploads, processed splits)."""
    return service.files()


@router.get("/preview", response_model=DatasetPreview, summary="Preview dataset records")
def preview(
    service: DataServiceDep,
    file_path: Annotated[str, Query(description="Relative to the data dir, or absolute inside an allowed root.")],
    offset: Annotated[int, Query(ge=0, description="Records to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Records to return.")] = 20,
) -> DatasetPreview:
    """Show a window of a dataset's records, normalised to messages, with each bad record's reason."""
    return service.preview(file_path, offset, limit)
