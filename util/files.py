"""Atomic file output: a reader sees the old file or folder, or the finished new one, never a half-written one.

Every output this service publishes carries a marker (its kind and task id): `overwrite` only ever replaces an
output of the same kind that this service wrote, never a user's folder, a root or the task database.

Anyone who can create files in the allowed folders can plant symbolic links there, so nothing here writes or serves
through a name that was there before: every write goes to a temporary file created exclusively (a new name, O_EXCL)
and is moved into place with os.replace (which replaces a link, never follows it), and stored files are opened
without following links (open_stored).
"""

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from util.errors import ConflictError, ForbiddenPathError, NotFoundError

OUTPUT_MARKER = ".wintrain-output.json"
MARKER_MAX_BYTES = 1 << 20


def default_file_mode() -> int:
    """The mode a plain open() gives a new file under this process's umask (mkstemp's files are 0600)."""
    return default_dir_mode() & 0o666


@contextmanager
def atomic_write(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """Write `path` through a temporary file created exclusively beside it, then move it into place.

    The temporary name is new (mkstemp: O_CREAT|O_EXCL), so a link planted under any name in the folder is never
    written through; os.replace then puts the file in place of whatever was at `path` (a planted link included,
    which is replaced, not followed). On an error the temporary file is removed and `path` is left as it was.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, default_file_mode())  # the mode a plain write would have given, not mkstemp's 0600
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically, never through a link planted at its name or at a temporary name."""
    with atomic_write(path) as fh:
        fh.write(text)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (see atomic_write)."""
    write_text(path, json.dumps(data, indent=2, default=str))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; malformed JSON, nesting too deep to parse or a non-object raise ValueError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path.name} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return data


def marker_path(output: Path) -> Path:
    """Where an output's marker lives: inside a folder, or beside a file output (an archive) as a hidden file."""
    if output.is_file() or output.name.endswith(".tar.gz"):
        return output.with_name(f".{output.name}{OUTPUT_MARKER}")
    return output / OUTPUT_MARKER


def read_marker(output: Path) -> dict[str, Any] | None:
    """The marker of an output this service wrote, or None (absent, unreadable, or a link: never followed)."""
    try:
        fd = os.open(marker_path(output), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            data = json.loads(fh.read(MARKER_MAX_BYTES + 1)[:MARKER_MAX_BYTES].decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def write_marker(output: Path, kind: str, task_id: str, **extra: Any) -> None:
    """Mark `output` (a folder, or a file's side marker) as written by this service as a `kind` output."""
    data = {"kind": kind, "task_id": task_id, "written_at": datetime.now(UTC).isoformat(), **extra}
    write_json(marker_path(output), data)


def holds_data(output: Path) -> bool:
    """Whether `output` exists as a file, a link or a non-empty folder."""
    if output.is_symlink():
        return True
    if output.is_dir():
        return any(output.iterdir())
    return output.exists()


def check_replaceable(output: Path, kind: str, name: str | None = None) -> bool:
    """True when `output` holds a `kind` output this service wrote; False when it is absent or an empty folder.

    Anything else (a user's folder or file, a link, another kind's output) raises ConflictError: it is never replaced.
    """
    if output.is_symlink():
        raise ConflictError(
            f"'{name or output.name}' is a symbolic link; an output is never written through a link. "
            "Choose a new or empty folder.",
            details={"path": name or output.name, "kind": kind, "found": "symlink"},
        )
    if not holds_data(output):
        return False
    marker = read_marker(output)
    if marker is None or marker.get("kind") != kind:
        what = f"{_article(marker['kind'])} output" if marker else "files this service did not write"
        raise ConflictError(
            f"'{name or output.name}' already holds {what}; only {_article(kind)} output this service wrote can be "
            "replaced or written into. Choose a new or empty folder.",
            details={"path": name or output.name, "kind": kind, "found": marker["kind"] if marker else None},
        )
    return True


def _article(kind: str) -> str:
    """'an export', 'a train'."""
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _umask() -> int:
    """The umask of this process, read without changing it where the system tells it (Linux), else set back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """The mode a plain mkdir gives under this process's umask (mkdtemp's folders are 0700)."""
    return 0o777 & ~_umask()


def fresh_dir(output: Path) -> Path:
    """An empty staging folder next to `output`; publish() moves it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))


def publish(staging: Path, output: Path, kind: str, task_id: str, **extra: Any) -> None:
    """Replace `output` (a folder or a file) with the finished staging one, marked as a `kind` output.

    Refuses (ConflictError) to replace anything but an output of the same kind that this service wrote.
    """
    check_replaceable(output, kind)
    check_holds_no_output(output)
    if staging.is_dir():
        write_marker(staging, kind, task_id, **extra)
        staging.chmod(default_dir_mode())
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    staging.replace(output)
    if output.is_file():
        write_marker(output, kind, task_id, **extra)


# -- nested outputs: one output never holds another ---------------------------------------------------------


def _marked_in(folder: str, names: Iterable[str]) -> Iterator[tuple[Path, bool]]:
    """The outputs whose markers are among `names` in `folder`: (output, is the folder itself)."""
    for name in names:
        if name == OUTPUT_MARKER:
            yield Path(folder), True
        elif name.startswith(".") and name.endswith(OUTPUT_MARKER) and len(name) > len(OUTPUT_MARKER) + 1:
            yield Path(folder) / name[1 : -len(OUTPUT_MARKER)], False  # a file output's side marker


def outputs_within(folder: Path, limit: int | None = None) -> list[Path]:
    """The marked outputs strictly inside `folder` (its own marker aside), found without following links.

    With `limit`, the walk stops after that many entries (a huge folder is not searched to the end).
    """
    found: list[Path] = []
    if folder.is_symlink() or not folder.is_dir():
        return found
    seen = 0
    for current, dirs, files in os.walk(folder):  # os.walk never descends into a linked folder
        seen += len(dirs) + len(files)
        found += [out for out, own in _marked_in(current, files) if not (own and out == folder)]
        if limit is not None and seen > limit:
            break
    return found


def enclosing_output(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest marked output folder that `path` lies strictly inside, with its marker; None when there is none."""
    for parent in path.parents:
        if (parent / OUTPUT_MARKER).is_file() or (parent / OUTPUT_MARKER).is_symlink():
            return parent, read_marker(parent) or {"kind": "unknown"}
    return None


def check_holds_no_output(output: Path) -> None:
    """Refuse (ConflictError) to replace or delete a folder that holds another output: it would go with it."""
    nested = outputs_within(output)
    if nested:
        marker = read_marker(nested[0]) or {}
        raise ConflictError(
            f"'{output.name}' holds {len(nested)} other output(s) (e.g. '{nested[0].relative_to(output)}'"
            + (f" of task {marker['task_id']}" if marker.get("task_id") else "")
            + "); it is never replaced or deleted as a whole. Nothing was changed.",
            details={"path": output.name, "nested": [p.relative_to(output).as_posix() for p in nested[:20]]},
        )


def remove_output(output: Path, kind: str, task_id: str, name: str | None = None) -> None:
    """Delete the `kind` output of task `task_id`: only its own marked folder or file, never through a link.

    Refused (ConflictError) when `output` is a link, does not carry this task's marker (it was replaced by something
    else), or holds another output; nothing is deleted then.
    """
    shown = name or output.name
    if output.is_symlink():
        raise ConflictError(f"'{shown}' is a symbolic link, not the output of task {task_id}; nothing was deleted.")
    marker = read_marker(output)
    if marker is None or marker.get("kind") != kind or marker.get("task_id") != task_id:
        raise ConflictError(
            f"'{shown}' does not carry the marker of task {task_id}'s output (it was moved or replaced); "
            "nothing was deleted.",
            details={"path": shown, "task_id": task_id, "found": (marker or {}).get("task_id")},
        )
    if output.is_dir():
        check_holds_no_output(output)
        shutil.rmtree(output)
    else:
        output.unlink()
        marker_path(output).unlink(missing_ok=True)


# -- a train output rebuilt as a fresh folder -----------------------------------------------------------------


def _drop_unsafe(folder: Path) -> list[str]:
    """Inside a folder only this process can enter: remove links and special files, copy shared-inode files.

    What remains are folders and regular files with one name each, so nothing written below `folder` can land
    outside it. Returns the paths removed or copied (relative), for the log.
    """
    changed: list[str] = []
    for current, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(current) / name
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            rel = path.relative_to(folder).as_posix()
            if not stat.S_ISREG(st.st_mode):  # a link (to a folder too: os.walk lists it, never enters it)
                path.unlink()
                changed.append(rel)
            elif st.st_nlink > 1:  # a hard link to a file elsewhere: appending to it would write there
                with atomic_write(path, binary=True) as out, path.open("rb") as src:
                    shutil.copyfileobj(src, out)
                changed.append(rel)
        dirs[:] = [d for d in dirs if (Path(current) / d).is_dir() and not (Path(current) / d).is_symlink()]
    return changed


def claim_fresh(output: Path, kind: str, task_id: str, **extra: Any) -> list[str]:
    """Make `output` a folder this process just created (mode 0700 until release()), keeping what it held.

    A task that writes into an earlier output (overwrite, resume) would otherwise write through links planted
    there. The earlier content is moved (not copied: checkpoints are large) into a fresh mkdtemp folder, whatever
    could lead outside is dropped there (links, special files; multiply linked files are copied), and the fresh
    folder, marked as this task's, takes the output's place. Refuses (ConflictError) anything check_replaceable
    refuses and a folder holding another output. Returns what was dropped or copied (relative paths).
    """
    check_replaceable(output, kind)
    check_holds_no_output(output)
    staging = fresh_dir(output)
    aside: Path | None = None
    moved: list[str] = []
    try:
        if output.is_dir():
            for entry in list(output.iterdir()):
                if entry.name != OUTPUT_MARKER:
                    entry.rename(staging / entry.name)  # a link moves as a link; _drop_unsafe removes it
                    moved.append(entry.name)
        dropped = _drop_unsafe(staging)
        write_marker(staging, kind, task_id, **extra)
        if output.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            output.rename(aside)  # over the empty folder mkdtemp made
        staging.rename(output)
    except BaseException:
        # Put everything back: a failed claim must not lose the checkpoints it was moving.
        if aside is not None and not output.exists() and not output.is_symlink():
            aside.rename(output)
            aside = None
        for name in moved:
            with suppress(OSError):
                (staging / name).rename(output / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return dropped


def release(output: Path, kind: str, task_id: str) -> None:
    """Give a folder claimed with claim_fresh the mode a plain mkdir would have (it is 0700 while written).

    Only a folder that carries this task's marker: a refused claim leaves someone else's folder as it was.
    """
    marker = read_marker(output) or {}
    if marker.get("kind") == kind and marker.get("task_id") == task_id and not output.is_symlink():
        output.chmod(default_dir_mode())


# -- serving stored files: never through a link ---------------------------------------------------------------


def _open_below(root: Path, parts: tuple[str, ...]) -> BinaryIO:
    """Open root/parts... for reading: each folder below `root` and the file itself opened without following links."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)  # NONBLOCK: a FIFO must not hang the open
    finally:
        os.close(fd)
    fh = os.fdopen(file_fd, "rb")
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        fh.close()
        raise IsADirectoryError(errno.EISDIR, "not a regular file")
    os.set_blocking(file_fd, True)
    return fh


def _any_link(base: Path, parts: tuple[str, ...]) -> bool:
    """Whether any step of base/parts... is a symbolic link now."""
    path = base
    for part in parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def open_stored(path: Path, roots: Iterable[Path], name: str) -> BinaryIO:
    """Open a stored file to serve it, refusing a link at its name or at any folder between it and its root.

    The open itself walks the path one folder at a time (O_NOFOLLOW at each step), so a file or folder swapped for
    a link after any check is refused at the moment it is opened. `name` is how messages call the file (never a
    server path). Raises NotFoundError when it is gone, ForbiddenPathError for a link or a path outside the roots.
    """
    path = Path(os.path.abspath(path))
    for root in roots:
        for base in dict.fromkeys((Path(os.path.abspath(root)), root.resolve())):
            try:
                parts = path.relative_to(base).parts
            except ValueError:
                continue
            if not parts:
                break
            try:
                return _open_below(base, parts)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _any_link(base, parts):
                    raise ForbiddenPathError(
                        f"{name} was replaced by a symbolic link (or lies in a linked folder); it is not served.",
                    ) from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise NotFoundError(f"{name} is gone.") from None
                if exc.errno == errno.EISDIR:
                    raise NotFoundError(f"{name} is not a regular file.") from None
                raise
    raise ForbiddenPathError(f"{name} lies outside the allowed roots; it is not served.")
