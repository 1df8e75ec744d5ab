"""Multipart uploads read as they stream: the file part goes straight into its destination's temporary file.

FastAPI's `UploadFile` would first spool the whole body to the temp dir, so an upload over the cap was stored in
full (twice on disk, once copied) before it was refused. Here the service opens its file as soon as the file
part's headers arrive (so a bad name is refused before any content is read), each batch of content is written in
a worker thread, and the service's writer refuses the batch that would pass data.max_upload_mb (413). Whatever
fails, the temporary file is removed.
"""

import codecs
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from util.errors import InvalidInputError

WRITE_BATCH = 1024 * 1024  # file content is handed to the writer (in a thread) in batches of about this size
MAX_FIELD_BYTES = 64 * 1024  # all the form fields besides the file, together


class FileSink(Protocol):
    """Where the file part's content goes: the upload services' temporary-file writers."""

    def write(self, chunk: bytes) -> None:
        """Append content (raising PayloadTooLargeError past the cap)."""

    def discard(self) -> None:
        """Close and remove the temporary file."""


S = TypeVar("S", bound=FileSink)


def multipart_body(file_description: str, fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """`openapi_extra` documenting the multipart body these routes read themselves (the file field is `file`)."""
    properties = {
        "file": {"type": "string", "contentMediaType": "application/octet-stream", "description": file_description},
        **fields,
    }
    schema = {"type": "object", "required": ["file", *required], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def form_bool(fields: dict[str, str], name: str, default: bool = False) -> bool:
    """A form field read as a boolean the way FastAPI reads one (true/false, 1/0, yes/no, on/off)."""
    if name not in fields:
        return default
    try:
        return TypeAdapter(bool).validate_python(fields[name])
    except ValidationError as exc:
        errors = [{"loc": ("body", name), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise RequestValidationError(errors) from None


class _Reader:
    """python-multipart callbacks: form fields into a dict, the file part's content into `pending`."""

    def __init__(self, charset: str, file_field: str) -> None:
        self.charset = charset
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.field_bytes = 0
        self.filename: str | None = None  # the file part's name, once its headers are read
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.ended = False
        self._disposition = b""
        self._header_name = b""
        self._header_value = b""
        self._part: str | None = None  # "file", "field", or "skip" (another part with a file name: not ours)
        self._name = ""
        self._data = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        """The parser's callback table."""
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def decode(self, raw: bytes) -> str:
        """A header parameter or field value as text (the body's charset, else Latin-1)."""
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def on_part_begin(self) -> None:
        self._disposition, self._part, self._data = b"", None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidInputError("A multipart part has no name in its Content-Disposition header.")
        self._name = self.decode(options[b"name"])
        if self._name == self.file_field:
            if self.filename is not None:
                raise InvalidInputError(f"Send one file per upload; the body has more than one '{self.file_field}'.")
            self.filename = self.decode(options.get(b"filename", b""))
            self._part = "file"
        else:
            self._part = "skip" if b"filename" in options else "field"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.pending.append(data[start:end])
            self.pending_size += end - start
        elif self._part == "field":
            self.field_bytes += end - start
            if self.field_bytes > MAX_FIELD_BYTES:
                raise InvalidInputError(f"The form fields besides the file exceed {MAX_FIELD_BYTES // 1024} KB.")
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._part == "field":
            self.fields[self._name] = self.decode(bytes(self._data))
        self._part = None

    def on_end(self) -> None:
        self.ended = True


class Received(NamedTuple, Generic[S]):
    """A multipart body read to its end: the file's sink (its content written), the file's name, the fields."""

    file: S
    filename: str
    fields: dict[str, str]


async def stream_upload(
    request: Request,
    open_file: Callable[[str, dict[str, str]], S],
    required: tuple[str, ...] = (),
    file_field: str = "file",
) -> Received[S]:
    """Read a multipart/form-data body to its end, the file part streamed into a sink.

    The `file_field` part goes into the sink `open_file(filename, the fields read so far)` returns, the other
    fields into a dict. 422 (as FastAPI words it) when the file or a `required` field is missing.
    """
    media, params = parse_options_header(request.headers.get("content-type"))
    if media != b"multipart/form-data":
        _missing([file_field, *required])
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInputError("The multipart/form-data Content-Type has no boundary.")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    reader = _Reader(charset, file_field)
    sink: S | None = None
    try:
        try:
            parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
            async for chunk in request.stream():
                parser.write(chunk)
                if sink is None and reader.filename is not None:
                    sink = await anyio.to_thread.run_sync(open_file, reader.filename, dict(reader.fields))
                if sink is not None and reader.pending_size >= WRITE_BATCH:
                    await _flush(reader, sink)
            parser.finalize()
        except FormParserError as exc:
            raise InvalidInputError(f"The multipart body cannot be read: {exc}") from None
        except ClientDisconnect:
            raise InvalidInputError("The client closed the connection before the end of the upload.") from None
        if sink is not None:
            await _flush(reader, sink)
        if not reader.ended:
            raise InvalidInputError("The multipart body ended before its closing boundary; the upload is incomplete.")
        if sink is None:
            _missing([file_field, *(f for f in required if f not in reader.fields)])
        _missing([f for f in required if f not in reader.fields])
    except BaseException:
        if sink is not None:
            with anyio.CancelScope(shield=True):  # removed even when the request is being cancelled
                await anyio.to_thread.run_sync(sink.discard)
        raise
    assert sink is not None and reader.filename is not None  # else _missing raised
    return Received(sink, reader.filename, reader.fields)


async def _flush(reader: _Reader, sink: FileSink) -> None:
    """Hand the file content read so far to the sink, in a worker thread."""
    if reader.pending:
        batch = b"".join(reader.pending)
        reader.pending.clear()
        reader.pending_size = 0
        await anyio.to_thread.run_sync(sink.write, batch)


def _missing(names: list[str]) -> None:
    """422 for absent form fields, worded as FastAPI words a missing File() or Form()."""
    if names:
        raise RequestValidationError([{"loc": ("body", n), "msg": "Field required", "type": "missing"} for n in names])
