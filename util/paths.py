"""Path sandbox: client paths resolve inside a root, never to a server-owned file; an output replaces no root."""

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from util.errors import ConflictError, ForbiddenPathError, InvalidInputError
from util.files import OUTPUT_MARKER, enclosing_output, outputs_within, read_marker

if TYPE_CHECKING:
    from util.settings import Settings

# Folders of the model dir and the data dir that hold the service's outputs and files (never an output themselves).
MODEL_FOLDERS = (("outputs", "train outputs"), ("exports", "exports"), ("runs", "runs"))
DATA_FOLDERS = (("evals", "evaluations"), ("uploads", "uploads"), ("files", "stored files"))
NESTED_WALK_LIMIT = 20000  # entries searched for outputs inside a requested output (a user's huge folder: cut short)


def is_within(path: Path, root: Path) -> bool:
    """Return True when `path` equals `root` or lies below it (both resolved)."""
    return path == root or root in path.parents


def file_ids(paths: Iterable[Path]) -> set[tuple[int, int]]:
    """The (device, inode) pairs of those paths that exist: the same file under any other name has one of them."""
    ids = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def check_not_private(path: Path, raw: str, private: Iterable[Path]) -> None:
    """Refuse a resolved client path that is (or lies in) a server-owned file or folder, or an output marker.

    Opening the task database from the server process (even only to read it) and closing it drops the process's
    SQLite locks (POSIX fcntl semantics): a worker could then delete the live WAL and lose tasks. The inode check
    catches a hard link to such a file planted inside a root.
    """
    private = list(private)
    if any(OUTPUT_MARKER in part for part in path.parts) or any(is_within(path, p.resolve()) for p in private):
        owned = True
    else:
        owned = bool(file_ids([path]) & file_ids(private))
    if owned:
        raise ForbiddenPathError(
            f"Path '{raw}' names a file the server keeps for itself (the task database, its journals, task logs or "
            "an output marker); clients cannot read or write it.",
            details={"path": raw},
        )


def resolve_client_path(raw: str, base: Path, roots: list[Path], private: Iterable[Path] = ()) -> Path:
    """Resolve a client path (relative to `base`): refuse it unless it lies inside a root, outside `private`."""
    if not raw or not raw.strip():
        raise InvalidInputError("A path or model is empty; was a shell variable such as $TASK_ID left unset?")
    if "\x00" in raw:
        raise ForbiddenPathError("A path must not contain NUL bytes.")
    candidate = Path(raw)  # never expanduser: '~' is an ordinary name here, and '~user' must not look up accounts
    if not candidate.is_absolute():
        candidate = base / candidate
    resolved = candidate.resolve()
    if not any(is_within(resolved, root.resolve()) for root in roots):
        # The message names the roots by role only: a client never learns the server's absolute paths.
        raise ForbiddenPathError(
            f"Path '{raw}' resolves outside the allowed roots (the data dir, the model dir and any configured "
            "allowed_roots); use a path relative to one of them.",
            details={"path": raw},
        )
    check_not_private(resolved, raw, private)
    return resolved


def resolve_in_roots(raw: str, base: Path, settings: "Settings") -> Path:
    """Resolve a client path against the settings' roots, refusing the server's own files."""
    return resolve_client_path(raw, base, settings.roots, settings.private_paths)


def check_output_location(
    path: Path,
    raw: str,
    reserved: Iterable[tuple[Path, str]],
    sealed: Iterable[tuple[Path, str]] = (),
) -> None:
    """Refuse an output that is or contains a reserved folder (a root, the DB's folder), or touches a sealed one.

    `reserved` and `sealed` pair a folder with the words that name it in the message (never its absolute path).
    Replacing such a folder would delete the data dir, the task database or a base model.
    """
    path = path.resolve()
    for folder, label in reserved:
        folder = folder.resolve()
        if path == folder or path in folder.parents:
            what = "is" if path == folder else "contains"
            raise ForbiddenPathError(
                f"Output '{raw}' {what} {label}; an output must be a sub-folder of a root, e.g. 'exports/my-model'.",
                details={"path": raw},
            )
    for folder, label in sealed:
        folder = folder.resolve()
        if path == folder or path in folder.parents or folder in path.parents:
            raise ForbiddenPathError(
                f"Output '{raw}' lies in or contains {label}, which outputs never write to.", details={"path": raw}
            )


def resolve_output_path(
    raw: str,
    base: Path,
    roots: list[Path],
    reserved: Iterable[tuple[Path, str]],
    sealed: Iterable[tuple[Path, str]] = (),
    private: Iterable[Path] = (),
) -> Path:
    """Resolve a client output path inside the roots and refuse the folders an output must never be."""
    path = resolve_client_path(raw, base, roots, private)
    check_output_location(path, raw, reserved, sealed)
    return path


def output_guards(settings: "Settings") -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """The folders no output may be or contain (roots, the DB's folder), and those it may not touch (base models)."""
    reserved = [
        (settings.paths.data_dir, "the data dir"),
        (settings.paths.model_dir, "the model dir"),
        *((root, "an allowed root") for root in settings.paths.allowed_roots),
        (settings.paths.db_path.parent, "the task database's folder"),
        (settings.logs_dir, "the task logs folder"),
        # The folders the service's own outputs and files go in: an output there would hold every later one.
        *((settings.paths.model_dir / name, f"the {what} folder (model/{name})") for name, what in MODEL_FOLDERS),
        *((settings.paths.data_dir / name, f"the {what} folder ({name})") for name, what in DATA_FOLDERS),
    ]
    sealed = [(settings.paths.model_dir / "base", "the base-model store (model/base)")]
    base_model = settings.base_model_path()
    if base_model.exists():
        sealed.append((base_model, "the default base model"))
    return reserved, sealed


def shown_path(path: Path, roots: Iterable[Path]) -> str:
    """A server path as a client may see it: relative to the root holding it, else its name alone."""
    for root in roots:
        root = root.resolve()
        if is_within(path, root):
            return path.relative_to(root).as_posix() or "."
    return path.name


def check_not_nested(path: Path, raw: str, roots: Iterable[Path]) -> None:
    """Refuse (409) an output inside another task's output, or one holding another: deleting one would delete both.

    Outputs on disk are found by their markers; the store's check (TaskStore.create) covers queued tasks whose
    output does not exist yet, and two requests racing.
    """
    roots = list(roots)
    outer = enclosing_output(path)
    if outer is not None:
        folder, marker = outer
        owner = f"the output of task {marker['task_id']}" if marker.get("task_id") else "an output"
        raise ConflictError(
            f"Output '{raw}' lies inside {owner} ('{shown_path(folder, roots)}'); outputs may not be nested. "
            "Choose a folder outside it.",
            details={"path": raw, "inside": shown_path(folder, roots), "task_id": marker.get("task_id")},
        )
    inner = outputs_within(path, limit=NESTED_WALK_LIMIT)
    if inner:
        marker = read_marker(inner[0]) or {}
        owner = f"the output of task {marker['task_id']}" if marker.get("task_id") else "an output"
        raise ConflictError(
            f"Output '{raw}' holds {owner} ('{shown_path(inner[0], roots)}'); outputs may not be nested. "
            "Choose a folder that holds no other output.",
            details={"path": raw, "holds": shown_path(inner[0], roots), "task_id": marker.get("task_id")},
        )


def resolve_output(raw: str, base: Path, settings: "Settings") -> Path:
    """Resolve an output path a client sent (relative to `base`) against the settings' roots and guards."""
    reserved, sealed = output_guards(settings)
    path = resolve_output_path(raw, base, settings.roots, reserved, sealed, settings.private_paths)
    check_not_nested(path, raw, settings.roots)
    return path
