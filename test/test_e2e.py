"""End to end: a real uvicorn server in its own process, driven by test/TrainAPITest.py over HTTP."""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from conftest import TINY_NAME
from util.settings import PROJECT_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tmp_path, tiny_model_root) -> Iterator[str]:
    """Start `python main.py --config ... --port N` and wait for /health."""
    cfg = {
        "paths": {
            "data_dir": str(tmp_path / "data"),
            "model_dir": str(tiny_model_root),
            "db_path": str(tmp_path / "t.db"),
        },
        "models": {"base_model": TINY_NAME},
        "jobs": {"poll_interval": 0.2},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--config", str(config), "--port", str(port), "--log-level", "warning"],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(tmp_path / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_train_api_script_against_live_server(live_server):
    result = subprocess.run(
        [sys.executable, "test/TrainAPITest.py", "--base-url", live_server, "--steps", "3", "--timeout", "180"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
    assert "[PASS] trl training succeeded" in result.stdout
    assert "[PASS] lora training succeeded" in result.stdout
