"""Atomic file output: a reader sees the old file or folder, or the finished new one, never a half-written one."""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def fresh_dir(output: Path) -> Path:
    """An empty staging folder next to `output`; publish() moves it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))


def publish(staging: Path, output: Path) -> None:
    """Replace `output` (a folder or a file) with the finished staging one."""
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    staging.replace(output)
