"""Files a task wrote into its output folder: listing and sandboxed download paths."""

from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from entity.files import FileEntry, TaskFileList
from service.tasks import TaskStore
from util.errors import ForbiddenPathError, NotFoundError
from util.files import open_stored
from util.paths import is_within, resolve_client_path
from util.settings import Settings

MAX_FILES = 2000


def file_entry(path: Path, root: Path) -> FileEntry:
    """A file's listing entry relative to `root`."""
    stat = path.stat()
    return FileEntry(
        path=path.relative_to(root).as_posix(),
        size_bytes=stat.st_size,
        modified_at=datetime.fromtimestamp(stat.st_mtime, UTC),
    )


def list_files(root: Path, suffixes: tuple[str, ...] | None = None, limit: int = MAX_FILES) -> tuple[list[Path], bool]:
    """Regular files below `root` (no hidden names, nothing whose real path leaves `root`), sorted, at most `limit`."""
    found: list[Path] = []
    real_root = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if suffixes and path.suffix.lower() not in suffixes:
            continue
        if not is_within(path.resolve(), real_root):  # a symlink pointing out of the folder is not listed
            continue
        if len(found) == limit:
            return found, True
        found.append(path)
    return found, False


class OutputFileService:
    """Lists and hands out a task's output files, never anything outside its folder and the roots."""

    def __init__(self, settings: Settings, store: TaskStore) -> None:
        """Bind to the settings (roots) and the task store."""
        self.settings = settings
        self.store = store

    def _output(self, task_id: str) -> Path:
        """The task's output folder (or single output file), checked against the roots."""
        task = self.store.get(task_id)
        if not task.output_dir:
            raise NotFoundError(f"Task {task_id} has no output folder.", details={"task_id": task_id})
        path = Path(task.output_dir).resolve()
        if not any(is_within(path, root.resolve()) for root in self.settings.roots):
            raise ForbiddenPathError(f"Task {task_id}'s output lies outside the allowed roots.")
        if not path.exists():
            raise NotFoundError(
                f"Task {task_id} has written no output yet ({task.status}).", details={"task_id": task_id}
            )
        return path

    def list(self, task_id: str) -> TaskFileList:
        """Every file of the task's output, relative to its folder."""
        out = self._output(task_id)
        if out.is_file():
            return TaskFileList(
                task_id=task_id, output_dir=str(out.parent), items=[file_entry(out, out.parent)], truncated=False
            )
        files, truncated = list_files(out)
        return TaskFileList(
            task_id=task_id, output_dir=str(out), items=[file_entry(p, out) for p in files], truncated=truncated
        )

    def path(self, task_id: str, relative: str) -> Path:
        """The file `relative` inside the task's output; 403 if it leaves the folder, 404 if absent."""
        out = self._output(task_id)
        folder = out.parent if out.is_file() else out
        path = resolve_client_path(relative, folder, [folder], self.settings.private_paths)
        if out.is_file() and path != out:
            raise NotFoundError(f"Task {task_id} has no file '{relative}'.", details={"path": relative})
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            raise NotFoundError(f"Task {task_id} has no file '{relative}'.", details={"path": relative})
        return path

    def open(self, task_id: str, relative: str) -> tuple[BinaryIO, str]:
        """The file `relative` of the task's output, opened for download, and its name.

        Opened under the output path the task recorded, one folder at a time without following links: an output
        folder or file swapped for a link since it was written is refused (403), not served.
        """
        path = self.path(task_id, relative)
        out = self._output(task_id)
        stored = Path(self.store.get(task_id).output_dir or "")
        folder, stored_folder = (out.parent, stored.parent) if out.is_file() else (out, stored)
        target = stored_folder / path.relative_to(folder)
        return open_stored(target, self.settings.roots, f"File '{relative}' of task {task_id}"), path.name
