"""Atomic file output: a reader sees the old file or folder, or the finished new one, never a half-written one.

Every output this service publishes carries a marker (its kind and task id): `overwrite` only ever replaces an
output of the same kind that this service wrote, never a user's folder, a root or the task database.
"""

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from util.errors import ConflictError

OUTPUT_MARKER = ".wintrain-output.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


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
    """The marker of an output this service wrote, or None (absent or unreadable)."""
    try:
        data = read_json(marker_path(output))
    except (OSError, ValueError):
        return None
    return data if isinstance(data.get("kind"), str) else None


def write_marker(output: Path, kind: str, task_id: str, **extra: Any) -> None:
    """Mark `output` (a folder, or a file's side marker) as written by this service as a `kind` output."""
    data = {"kind": kind, "task_id": task_id, "written_at": datetime.now(UTC).isoformat(), **extra}
    write_json(marker_path(output), data)


def holds_data(output: Path) -> bool:
    """Whether `output` exists as a file or a non-empty folder."""
    if output.is_dir():
        return any(output.iterdir())
    return output.exists() or output.is_symlink()


def check_replaceable(output: Path, kind: str, name: str | None = None) -> bool:
    """True when `output` holds a `kind` output this service wrote; False when it is absent or an empty folder.

    Anything else (a user's folder or file, another kind's output) raises ConflictError: it is never replaced.
    """
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


def default_dir_mode() -> int:
    """The mode a plain mkdir gives under this process's umask (mkdtemp's folders are 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def fresh_dir(output: Path) -> Path:
    """An empty staging folder next to `output`; publish() moves it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))


def publish(staging: Path, output: Path, kind: str, task_id: str, **extra: Any) -> None:
    """Replace `output` (a folder or a file) with the finished staging one, marked as a `kind` output.

    Refuses (ConflictError) to replace anything but an output of the same kind that this service wrote.
    """
    check_replaceable(output, kind)
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
