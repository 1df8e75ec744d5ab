"""examples/sdk_*.py run against a live server on the tiny model, so they cannot rot."""

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import conftest
from conftest import start_server, stop_server
from util.settings import PROJECT_ROOT

EXAMPLES = PROJECT_ROOT / "examples"
KEY = "examples-key"


def example(name: str, url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one example script to its end."""
    cmd = [sys.executable, str(EXAMPLES / name), "--base-url", url, "--api-key", KEY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root) -> Iterator[str]:
    """One live server (with an API key) shared by the examples, which run one after another."""
    url, proc = start_server(tmp_path_factory.mktemp("examples"), tiny_model_root, {"auth": {"api_keys": [KEY]}})
    yield url
    stop_server(proc)


def test_sdk_batch_creates_watches_and_cancels(server):
    done = example("sdk_batch.py", server, "--jobs", "2", "--steps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("started ") == 2
    assert "cancelled" in done.stdout and "all done: ok" in done.stdout


def test_sdk_threads_runs_jobs_concurrently(server):
    done = example("sdk_threads.py", server, "--threads", "2", "--steps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("succeeded;") == 2 and "2/2 jobs succeeded" in done.stdout


def test_sdk_records_writes_json_and_csv(server, tmp_path):
    done = example("sdk_records.py", server, "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "jobs.json").read_text())
    rows = list(csv.DictReader((tmp_path / "jobs.csv").open()))
    assert len(records) == len(rows) >= 1  # the jobs of the tests before (or of this module alone)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert all(r["created_at"].endswith("+00:00") for r in rows), "times are written in UTC"
    only = example("sdk_records.py", server, "--out-dir", str(tmp_path / "none"), "--status", "running")
    assert only.returncode == 0 and "wrote 0 jobs" in only.stdout


def test_sdk_retry_waits_for_a_server_that_comes_up_late(tmp_path, tiny_model_root, monkeypatch):
    port = conftest.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(EXAMPLES / "sdk_retry.py"), "--base-url", url, "--api-key", KEY, "--steps", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT)
    try:
        time.sleep(2.0)  # the example is retrying against a closed port
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        monkeypatch.setattr(conftest, "free_port", lambda: port)
        _, server = start_server(tmp_path, tiny_model_root, {"auth": {"api_keys": [KEY]}})
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            stop_server(server)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "server not reachable" in out and "server up after" in out
    assert "succeeded" in out
