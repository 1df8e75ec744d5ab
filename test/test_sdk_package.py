"""The SDK installs on its own: a fresh venv with only its few dependencies runs `wintrain` against a live server."""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import start_server, stop_server
from util.settings import PROJECT_ROOT

SDK_DIR = PROJECT_ROOT / "sdk"
SERVER_SIDE = {"main", "controller", "service", "entity", "util", "torch", "transformers", "fastapi", "peft", "trl"}


def test_sdk_imports_no_server_module():
    """Every import in sdk/, lazy ones too, stays off the server, torch and FastAPI (the `server` command aside)."""
    for path in SDK_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in SERVER_SIDE:
                    assert (path.name, top) == ("cli.py", "main"), f"{path.name} imports {name}"


def _requirement_closure(names: list[str]) -> set[str]:
    """The distributions `names` need, recursively (extras and markers that do not apply left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        for req in dist.requires or []:
            if ";" in req and "extra ==" in req:
                continue
            if ";" in req and "python_version" in req and '< "3.1' in req.replace("'", '"'):
                continue
            todo.append(re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0])
    return seen


def _link_dependencies(site: Path, names: list[str]) -> None:
    """Make exactly the SDK's dependencies importable in the fresh venv (offline), from this venv's copies."""
    deps = site / "_sdk_deps"
    deps.mkdir()
    for name in _requirement_closure(names):
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (deps / top).exists() and top != "__pycache__":
                (deps / top).symlink_to(src)
    (site / "_sdk_deps.pth").write_text(str(deps) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the SDK wheel and httpx/typer/rich, nothing else."""
    root = tmp_path_factory.mktemp("sdk_venv")
    src = root / "src"
    shutil.copytree(SDK_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheels"), str(src)],
                   check=True, cwd=root)  # fmt: skip
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())  # fmt: skip
    wheel = next((root / "wheels").glob("wintrain_sdk-*.whl"))
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    _link_dependencies(site, ["httpx", "typer", "rich"])
    return venv


def test_the_sdk_alone_runs_the_cli_against_a_live_server(sdk_venv, tmp_path, tiny_model_root):
    python = sdk_venv / "bin" / "python"
    for absent in ("torch", "fastapi", "main", "service"):
        probe = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, text=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{absent} is importable in the SDK's venv"
    wintrain = sdk_venv / "bin" / "wintrain"
    shown = subprocess.run([str(wintrain), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "train" in shown.stdout and "health" in shown.stdout
    url, proc = start_server(tmp_path, tiny_model_root)
    try:
        health = subprocess.run([str(wintrain), "--base-url", url, "--json", "health"], capture_output=True,
                                text=True, cwd=tmp_path, timeout=60)  # fmt: skip
        assert health.returncode == 0, health.stderr
        assert '"status": "ok"' in health.stdout
        code = f"from sdk import TuningClient; print(TuningClient(base_url={url!r}).health()['base_model'])"
        sdk = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert sdk.returncode == 0 and sdk.stdout.strip() == "tiny-llama", sdk.stderr
        server_cmd = subprocess.run([str(wintrain), "server"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert server_cmd.returncode == 2 and "not installed here" in server_cmd.stderr
    finally:
        stop_server(proc)
