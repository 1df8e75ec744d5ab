"""Paths in responses: relative to the root that holds them (data, model or an allowed root), never absolute.

The server resolves and stores absolute paths; a client sees them as it would send them back: `uploads/x.jsonl`
(relative to the data dir), `outputs/<task_id>` (relative to the model dir). `controller/client_paths.py` binds
the serving app's roots for each request; outside a request (a worker, a test building a schema) paths stay as
they are.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import PlainSerializer

Roots = tuple[tuple[Path, str], ...]  # (resolved root, its role: "data", "model", "allowed_roots[i]")
_ROOTS: ContextVar[Roots | None] = ContextVar("client_roots", default=None)
OUTSIDE = "outside"  # the role of a path in no root (a base model configured elsewhere): only its name is shown


@contextmanager
def client_roots(roots: Roots) -> Iterator[None]:
    """Serialise paths relative to `roots` within this block (one request)."""
    token = _ROOTS.set(roots)
    try:
        yield
    finally:
        _ROOTS.reset(token)


def locate(value: str | None) -> tuple[str, str] | None:
    """(path relative to its root, the root's role) of an absolute server path; None outside a request."""
    roots = _ROOTS.get()
    if roots is None or not value:
        return None
    path = Path(value)
    if not path.is_absolute():
        return value, ""
    for root, role in roots:  # the innermost root first: an allowed root may lie inside the data dir
        if path == root or root in path.parents:
            return PurePosixPath(*path.relative_to(root).parts).as_posix() or ".", role
    return path.name, OUTSIDE


def to_client(value: str | None) -> str | None:
    """An absolute server path as the client sees it (relative to its root); anything else unchanged."""
    found = locate(value)
    return value if found is None else found[0]


def root_role(value: str | None) -> str | None:
    """The role of the root holding a server path ("data", "model", "allowed_roots[i]", "outside"), or None."""
    found = locate(value)
    return found[1] or None if found is not None else None


ClientPath = Annotated[str, PlainSerializer(to_client, return_type=str)]


def to_client_json(value: Any) -> Any:
    """JSON data (a stored request, metrics) with every absolute path inside a root shown relative to it."""
    if isinstance(value, dict):
        return {k: to_client_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_client_json(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        found = locate(value)
        if found is not None and found[1] != OUTSIDE:
            return found[0]
    return value


ClientJson = Annotated[dict[str, Any], PlainSerializer(to_client_json)]
