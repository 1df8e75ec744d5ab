"""Two API servers (two `main.py` processes) on one PostgreSQL store: each task runs once, both serve every task,
and a cancel sent to the server that did not start a task still kills its worker."""

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import SAMPLE, start_server, stop_server
from entity.task import TaskStatus
from service.jobs import pid_alive
from service.tasks import TaskStore

TERMINAL = {"succeeded", "failed", "cancelled"}


def _wait(url: str, task_id: str, until: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = httpx.get(f"{url}/api/train/status/{task_id}", timeout=10).json()
        if task["status"] in until:
            return task
        time.sleep(0.3)
    pytest.fail(f"task {task_id} never reached {until}: {task}")


def _sse_kinds(url: str, task_id: str) -> list[str]:
    kinds = []
    with httpx.stream("GET", f"{url}/api/train/events/{task_id}", timeout=30) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kinds.append(line.split(":", 1)[1].strip())
    return kinds


@pytest.fixture
def two_servers(tmp_path: Path, tiny_model_root: Path, pg_url: str):
    """Two servers, each its own port and config, sharing the data dir, the model store and the PostgreSQL store."""
    shared = tmp_path / "shared"
    (shared / "model").mkdir(parents=True)
    (shared / "model" / "base").symlink_to(tiny_model_root / "base", target_is_directory=True)
    extra = {
        "paths": {
            "data_dir": str(shared / "data"),
            "model_dir": str(shared / "model"),
            "db_path": str(shared / "t.db"),
        },
        "database": {"url": pg_url},
        "jobs": {"poll_interval": 0.2, "max_concurrent_jobs": 2, "cancel_grace_seconds": 2.0},
    }
    servers = []
    try:
        for name in ("a", "b"):  # one host: each server names itself (the default, the host name, is shared)
            (tmp_path / name).mkdir()
            jobs = {**extra["jobs"], "scheduler_id": f"server-{name}"}
            servers.append(start_server(tmp_path / name, tiny_model_root, {**extra, "jobs": jobs}))
        yield [url for url, _ in servers], TaskStore(pg_url)
    finally:
        for _, proc in servers:
            stop_server(proc)
    assert not (shared / "t.db").exists()  # nothing went to a SQLite file


def test_two_servers_share_one_store(two_servers):
    (a, b), store = two_servers
    urls = [a, b]
    ids = []
    for n in range(10):  # archive exports of the tiny base: real tasks that take seconds
        r = httpx.post(f"{urls[n % 2]}/api/export/archive", json={"output_path": f"exports/m{n}.tar.gz"}, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["task_id"])
    for n, task_id in enumerate(ids):
        task = _wait(urls[(n + 1) % 2], task_id, TERMINAL)  # watched through the other server
        assert task["status"] == "succeeded", task["error"]
    owners = {}
    for task_id in ids:
        # Started exactly once: one claim, one "running" event, by one of the two schedulers.
        events = httpx.get(f"{b}/api/train/logs/{task_id}", timeout=10).json()["items"]
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"], statuses
        assert events == httpx.get(f"{a}/api/train/logs/{task_id}", timeout=10).json()["items"]
        owners[task_id] = store.get(task_id).owner
    assert set(owners.values()) <= {"server-a", "server-b"}
    lists = [httpx.get(f"{url}/api/train/tasks", params={"limit": 50}, timeout=10).json() for url in urls]
    assert lists[0] == lists[1] and lists[0]["total"] == 10
    assert {t["id"] for t in lists[0]["items"]} == set(ids)
    assert _sse_kinds(a, ids[1])[-1] == _sse_kinds(b, ids[0])[-1] == "end"  # SSE from both, events from the store

    # A cancel sent to the server that did not start the task still kills its worker.
    up = httpx.post(f"{a}/api/data/upload", files={"file": ("s.json", SAMPLE.read_bytes())}, timeout=30)
    assert up.status_code == 201, up.text
    body = {
        "strategy": "lora",
        "dataset_path": "uploads/s.json",
        "config": {"max_steps": 100000, "per_device_train_batch_size": 1, "save_steps": 100000},
    }
    long = httpx.post(f"{a}/api/train/start", json=body, timeout=30)
    assert long.status_code == 202, long.text
    task_id = long.json()["task_id"]
    deadline = time.monotonic() + 120
    while (row := store.get(task_id)).current_step < 1:  # training, past the worker's own status check
        assert row.status in ("queued", "running") and time.monotonic() < deadline, (row.status, row.error)
        time.sleep(0.2)
    owner, other = (a, b) if row.owner == "server-a" else (b, a)
    cancelled = httpx.post(f"{other}/api/train/cancel/{task_id}", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    deadline = time.monotonic() + 20
    while pid_alive(row.pid):
        assert time.monotonic() < deadline, "the owning server did not kill the worker"
        time.sleep(0.2)
    time.sleep(1)  # the owner reaps: the kill must not turn into "failed"
    for url in (owner, other):
        task = httpx.get(f"{url}/api/train/status/{task_id}", timeout=10).json()
        assert task["status"] == TaskStatus.cancelled and task["error"] is None
        assert httpx.get(f"{url}/health", timeout=10).json()["jobs"]["active"] == 0
    again = httpx.post(f"{owner}/api/train/cancel/{task_id}", timeout=30)
    assert again.status_code == 409 and json.loads(again.text)["error"]["type"]
