"""Path sandbox: every client path must resolve inside an allowed root."""

from pathlib import Path

from util.errors import ForbiddenPathError, InvalidInputError


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
        # The message names the settings, not the server's absolute folders.
        raise ForbiddenPathError(
            f"Path '{raw}' resolves outside the allowed roots (the data dir, the model dir and paths.allowed_roots); "
            "give a path relative to them.",
            details={"path": raw},
        )
    return resolved
