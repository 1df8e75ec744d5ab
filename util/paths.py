"""Path sandbox: every client path must resolve inside an allowed root, and no output may replace one."""

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from util.errors import ForbiddenPathError, InvalidInputError

if TYPE_CHECKING:
    from util.settings import Settings


def is_within(path: Path, root: Path) -> bool:
    """Return True when `path` equals `root` or lies below it (both resolved)."""
    return path == root or root in path.parents


def resolve_client_path(raw: str, base: Path, roots: list[Path]) -> Path:
    """Resolve a client path (relative to `base`) and refuse it unless it lies inside a root."""
    if not raw or not raw.strip():
        raise InvalidInputError("A path or model is empty; was a shell variable such as $TASK_ID left unset?")
    if "\x00" in raw:
        raise ForbiddenPathError("A path must not contain NUL bytes.")
    candidate = Path(raw).expanduser()
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
    return resolved


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
) -> Path:
    """Resolve a client output path inside the roots and refuse the folders an output must never be."""
    path = resolve_client_path(raw, base, roots)
    check_output_location(path, raw, reserved, sealed)
    return path


def output_guards(settings: "Settings") -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """The folders no output may be or contain (roots, the DB's folder), and those it may not touch (base models)."""
    reserved = [
        (settings.paths.data_dir, "the data dir"),
        (settings.paths.model_dir, "the model dir"),
        *((root, "an allowed root") for root in settings.paths.allowed_roots),
        (settings.paths.db_path.parent, "the task database's folder"),
    ]
    sealed = [(settings.paths.model_dir / "base", "the base-model store (model/base)")]
    base_model = settings.base_model_path()
    if base_model.exists():
        sealed.append((base_model, "the default base model"))
    return reserved, sealed


def resolve_output(raw: str, base: Path, settings: "Settings") -> Path:
    """Resolve an output path a client sent (relative to `base`) against the settings' roots and guards."""
    reserved, sealed = output_guards(settings)
    return resolve_output_path(raw, base, settings.roots, reserved, sealed)
