"""End to end: a real uvicorn server in its own process, driven by test/TrainAPITest.py over HTTP."""

import subprocess
import sys
from collections.abc import Iterator

import pytest

from conftest import start_server, stop_server
from util.settings import PROJECT_ROOT

KEY = "e2e-key"


@pytest.fixture
def live_server(tmp_path, tiny_model_root) -> Iterator[str]:
    """A real uvicorn server on loopback serving the tiny model, with an API key required."""
    url, proc = start_server(tmp_path, tiny_model_root, {"auth": {"api_keys": [KEY]}})
    yield url
    stop_server(proc)


def test_train_api_script_against_live_server(live_server):
    result = subprocess.run(
        [
            sys.executable,
            "test/TrainAPITest.py",
            "--base-url",
            live_server,
            "--steps",
            "3",
            "--timeout",
            "180",
            "--api-key",
            KEY,
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
    assert "[PASS] trl training succeeded" in result.stdout
    assert "[PASS] lora training succeeded" in result.stdout
