"""Files of the OpenAI API: stored under the data dir, validated by the data service, listed with cursors."""

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from openai.types import FileDeleted, FileObject
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from entity.fine_tuning import FileRow
from entity.task import ACTIVE_STATUSES, TaskKind, TaskRow, TaskStatus
from service.data import MAX_NAME_BYTES, DataService, UploadWriter
from service.tasks import TaskStore
from util.errors import BadRequestError, ConflictError, NotFoundError
from util.files import open_stored, write_text
from util.settings import Settings

FILES_DIR = "files"
PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"
ERRORS_SHOWN = 5


def to_file_object(row: FileRow) -> FileObject:
    """A stored file as OpenAI's FileObject."""
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        object="file",
        purpose=row.purpose,  # type: ignore[arg-type]
        status="processed",
    )


def check_purpose(purpose: str) -> None:
    """400 for a purpose other than fine-tune."""
    if purpose not in PURPOSES:
        raise BadRequestError(
            f"purpose '{purpose}' is not supported here; upload training data with purpose 'fine-tune'.",
            param="purpose",
        )


class FileService:
    """Stores uploads for fine-tuning, refusing malformed ones with the line and the reason."""

    def __init__(self, settings: Settings, store: TaskStore, data: DataService) -> None:
        """Bind to the settings, the task store (its database holds the file rows) and the data service."""
        self.settings = settings
        self.store = store
        self.data = data
        self.dir = settings.data_dir / FILES_DIR
        FileRow.__table__.create(store.engine, checkfirst=True)

    def begin(self, filename: str, purpose: str | None = None) -> UploadWriter:
        """Check the upload's name (and its purpose, when already known), then open its temporary file."""
        if purpose is not None:
            check_purpose(purpose)
        name = Path(filename or "").name or "upload.jsonl"
        size = len(name.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            raise BadRequestError(
                f"The file name is {size} bytes long (UTF-8); at most {MAX_NAME_BYTES} are accepted.", param="file"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        return UploadWriter(self.dir / f"file-{uuid.uuid4().hex}.jsonl", self.settings.data.max_upload_mb)

    def finish(self, upload: UploadWriter, filename: str, purpose: str) -> FileObject:
        """Validate every record of a fully received upload, and keep it only if all are valid."""
        path = upload.target
        try:
            check_purpose(purpose)
            upload.close()
            upload.tmp.replace(path)
            report = self.data.validate(str(path))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            upload.discard()
        name = Path(filename or "").name or "upload.jsonl"
        if not report.valid:
            path.unlink(missing_ok=True)
            if report.total == 0:
                raise BadRequestError(f"File '{name}' has no records.", param="file", code="invalid_file")
            shown = "; ".join(f"line {e.line}: {e.reason}" for e in report.errors[:ERRORS_SHOWN])
            more = f" (and {report.invalid_count - ERRORS_SHOWN} more)" if report.invalid_count > ERRORS_SHOWN else ""
            raise BadRequestError(
                f"File '{name}' has {report.invalid_count} invalid record(s) of {report.total}: {shown}{more}",
                param="file",
                code="invalid_file",
                details={"errors": [e.model_dump() for e in report.errors]},
            )
        row = FileRow(
            id=path.stem,
            filename=name,
            purpose=purpose,
            bytes=upload.size,
            created_at=int(time.time()),
            path=str(path),
            kind=report.kind,
            records=report.valid_count,
        )
        with self.store.session() as s:
            s.add(row)
        return to_file_object(row)

    def row(self, file_id: str) -> FileRow:
        """A stored file or NotFoundError."""
        with self.store.session() as s:
            row = s.get(FileRow, file_id)
        if row is None:
            raise NotFoundError(f"No such file: '{file_id}'.", details={"file_id": file_id})
        return row

    def get(self, file_id: str) -> FileObject:
        """One file's FileObject."""
        return to_file_object(self.row(file_id))

    def open_content(self, file_id: str) -> tuple[BinaryIO, str]:
        """A file's bytes opened for reading (never through a link swapped in for the stored file), and its name."""
        row = self.row(file_id)
        name = f"The content of file '{file_id}'"
        return open_stored(Path(row.path), [self.settings.data_dir], name), row.filename

    def content_path(self, file_id: str) -> tuple[Path, str]:
        """Where a file's bytes are, and its name."""
        row = self.row(file_id)
        path = Path(row.path)
        if not path.is_file():
            raise NotFoundError(f"The content of file '{file_id}' is gone.", details={"file_id": file_id})
        return path, row.filename

    def page(self, after: str | None, limit: int, order: str, purpose: str | None) -> tuple[list[FileObject], bool]:
        """A page of files by creation time (then id), after the cursor file; and whether more follow."""
        query = select(FileRow)
        if purpose:
            query = query.where(FileRow.purpose == purpose)
        desc = order == "desc"
        if after:
            cursor = self.row(after)
            key = (cursor.created_at, cursor.id)
            if desc:
                query = query.where(
                    (FileRow.created_at < key[0]) | ((FileRow.created_at == key[0]) & (FileRow.id < key[1]))
                )
            else:
                query = query.where(
                    (FileRow.created_at > key[0]) | ((FileRow.created_at == key[0]) & (FileRow.id > key[1]))
                )
        if desc:
            query = query.order_by(FileRow.created_at.desc(), FileRow.id.desc())
        else:
            query = query.order_by(FileRow.created_at, FileRow.id)
        with self.store.session() as s:
            rows = list(s.scalars(query.limit(limit + 1)))
        return [to_file_object(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, file_id: str) -> FileDeleted:
        """Delete a file, unless a queued, running or paused job trains on it."""
        row = self.row(file_id)
        users = [t.id for t in self._active_jobs() if file_id in _job_files(t)]
        if users:
            raise ConflictError(
                f"File '{file_id}' is used by fine-tuning job(s) that have not finished: "
                + ", ".join(f"ftjob-{t}" for t in users),
                details={"file_id": file_id},
            )
        with self.store.session() as s:
            found = s.get(FileRow, file_id)
            if found is not None:
                s.delete(found)
        Path(row.path).unlink(missing_ok=True)
        return FileDeleted(id=file_id, deleted=True, object="file")

    def _active_jobs(self) -> list[TaskRow]:
        """Train tasks that are queued, running or paused."""
        statuses = [s.value for s in (*ACTIVE_STATUSES, TaskStatus.paused)]
        query = select(TaskRow).where(TaskRow.kind == TaskKind.train, TaskRow.status.in_(statuses))
        with self.store.session() as s:
            return list(s.scalars(query))

    def results_file(self, task: TaskRow, rows_of: Callable[[], list[dict[str, Any]]]) -> str:
        """The id of a finished job's results CSV (step and metrics per logged step), written once."""
        file_id = f"file-{task.id[:24]}"
        with self.store.session() as s:
            if s.get(FileRow, file_id) is not None:
                return file_id
        rows = rows_of()
        columns = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        extra = sorted({k for r in rows for k in r} - set(columns))
        lines = [",".join(columns + extra)]
        for record in rows:
            lines.append(",".join("" if record.get(c) is None else str(record[c]) for c in columns + extra))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{file_id}.csv"
        write_text(path, "\n".join(lines) + "\n")  # a temporary file created exclusively, then os.replace
        row = FileRow(
            id=file_id,
            filename="step_metrics.csv",
            purpose=RESULTS_PURPOSE,
            bytes=path.stat().st_size,
            created_at=int(time.time()),
            path=str(path),
            kind=None,
            records=len(rows),
            job_id=task.id,
        )
        try:
            with self.store.session() as s:
                s.add(row)
        except IntegrityError:
            pass  # a concurrent request wrote the same file first
        return file_id


def _job_files(task: TaskRow) -> set[str]:
    """The file ids a job trains on."""
    meta = (task.request or {}).get("openai") or {}
    return {f for f in (meta.get("training_file"), meta.get("validation_file")) if f}
