"""Two API servers (two `main.py` processes) on one PostgreSQL store: each task runs once, both serve every task,
a cancel sent to the server that did not start a task still kills its worker, and a killed server's tasks wait for
its own restart."""

import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import SAMPLE, start_server, stop_server
from entity.task import TaskStatus
from service.jobs import RESTART_ERROR, pid_alive
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
    servers: list[tuple[str, object]] = []

    def start(index: int) -> str:
        """Start server a (0) or b (1) with its own config and name; restarting one reuses both."""
        name = "ab"[index]
        (tmp_path / name).mkdir(exist_ok=True)
        jobs = {**extra["jobs"], "scheduler_id": f"server-{name}"}
        url, proc = start_server(tmp_path / name, tiny_model_root, {**extra, "jobs": jobs})
        servers.append((url, proc))
        return url

    try:
        # one host: each server names itself (the default, the host name, is shared)
        yield [start(0), start(1)], TaskStore(pg_url), servers, start
    finally:
        for _, proc in servers:
            stop_server(proc)
    assert not (shared / "t.db").exists()  # nothing went to a SQLite file


def _start_long_training(url: str, store: TaskStore) -> str:
    """Upload the sample and start a LoRA task that trains until stopped; its id, once it is training."""
    name = f"s-{uuid.uuid4().hex[:8]}"
    up = httpx.post(f"{url}/api/data/upload", files={"file": (f"{name}.json", SAMPLE.read_bytes())}, timeout=30)
    assert up.status_code == 201, up.text
    body = {
        "strategy": "lora",
        "dataset_path": f"uploads/{name}.json",
        "output_dir": f"outputs/{name}",
        "config": {"max_steps": 100000, "per_device_train_batch_size": 1, "save_steps": 100000},
    }
    long = httpx.post(f"{url}/api/train/start", json=body, timeout=30)
    assert long.status_code == 202, long.text
    task_id = long.json()["task_id"]
    deadline = time.monotonic() + 120
    while (row := store.get(task_id)).current_step < 1:  # training, past the worker's own status check
        assert row.status in ("queued", "running") and time.monotonic() < deadline, (row.status, row.error)
        time.sleep(0.2)
    return task_id


def test_two_servers_share_one_store(two_servers):
    (a, b), store, _, _ = two_servers
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
    task_id = _start_long_training(a, store)
    row = store.get(task_id)
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


def _wait_dead(pid: int, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_killed_server_leaves_its_tasks_to_its_own_restart(two_servers):
    urls, store, servers, start = two_servers
    first = _start_long_training(urls[0], store)
    second = _start_long_training(urls[1], store)
    rows = {task_id: store.get(task_id) for task_id in (first, second)}
    victim = "ab".index(rows[first].owner[-1])  # the server that runs the first task
    survivor = urls[1 - victim]
    os.kill(servers[victim][1].pid, signal.SIGKILL)  # no shutdown: its workers live on, its rows say running
    servers[victim][1].wait()
    os.kill(rows[first].pid, signal.SIGKILL)  # and the first task's worker dies while its server is down
    _wait_dead(rows[first].pid, "the worker outlived SIGKILL")
    time.sleep(3)  # many passes of the surviving scheduler: it must leave the other server's tasks alone
    for task_id in (first, second):
        assert httpx.get(f"{survivor}/api/train/status/{task_id}", timeout=10).json()["status"] == "running"
    assert pid_alive(rows[second].pid)

    restarted = start(victim)  # same jobs.scheduler_id: it takes its tasks back by today's restart rule
    task = httpx.get(f"{restarted}/api/train/status/{first}", timeout=10).json()
    assert task["status"] == "failed" and task["error"] == RESTART_ERROR, task  # its worker was gone
    assert httpx.get(f"{survivor}/api/train/status/{first}", timeout=10).json()["status"] == "failed"
    # The second task's worker is alive: whichever server owns it still runs it, and a cancel through the
    # server that did not start it still kills it.
    assert httpx.get(f"{restarted}/api/train/status/{second}", timeout=10).json()["status"] == "running"
    other = survivor if rows[second].owner == rows[first].owner else restarted
    cancelled = httpx.post(f"{other}/api/train/cancel/{second}", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    _wait_dead(rows[second].pid, "the cancelled worker of the second task lives on")
