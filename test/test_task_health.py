"""A full disk fails a task at once (and /health says so), a stopped worker shows as stalled, max_runs' Retry-After."""

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pg import both_backends
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from conftest import SAMPLE, TINY_NAME, wait_for
from entity.task import TaskKind, TaskOut, TaskRow, TaskStatus, utcnow
from main import create_app
from service import tasks, worker
from service.db import RESERVE_BYTES, is_disk_full, retry_store
from service.jobs import JobRunner, RunningJob, describe_exit
from service.tasks import TaskStore
from util.settings import PROJECT_ROOT, Settings, load_settings

TMPFS_MIB = 4


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, tiny filesystem (a 4 MiB tmpfs) that a test can fill; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a file still open: detach it anyway


def fill(folder: Path) -> OSError:
    """Write a filler file in `folder` until its disk is full; return the real ENOSPC error."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 65536)  # unbuffered: nothing is left to flush (and fail) at close
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return exc
    finally:
        os.close(fd)


def disk_settings(root: Path, model_root: Path, **jobs: object) -> Settings:
    """Settings whose data dir, model dir and SQLite store all live under `root`."""
    (root / "model").mkdir(exist_ok=True)
    if not (root / "model" / "base").exists():
        (root / "model" / "base").symlink_to(model_root / "base", target_is_directory=True)
    return load_settings(
        PROJECT_ROOT / "config.yaml",
        {
            "paths": {"data_dir": root / "data", "model_dir": root / "model", "db_path": root / "state" / "tasks.db"},
            "models": {"base_model": TINY_NAME},
            "jobs": {"poll_interval": 0.2, "cancel_grace_seconds": 2.0, "max_concurrent_jobs": 1, **jobs},
            "train": {"max_length": 256},
        },
    )


def running_task(store: TaskStore, request: dict | None = None) -> TaskRow:
    """A task claimed by a scheduler, as a worker finds it."""
    store.create(TaskKind.train, request or {})
    task = store.claim_next("test")
    assert task is not None
    return task


# -- disk full ---------------------------------------------------------------------------------------------------


def train_until_first_step(client: TestClient, settings: Settings, output_dir: str, max_steps: int) -> tuple[str, dict]:
    """Start a LoRA task on the sample data and wait until it has made a step; return its id and status."""
    (settings.data_dir / "train.json").write_bytes(SAMPLE.read_bytes())
    config = {"max_steps": max_steps, "save_steps": 100_000, "per_device_train_batch_size": 2}
    body = {"strategy": "lora", "dataset_path": "train.json", "output_dir": output_dir, "config": config}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 120
    while (task := client.get(f"/api/train/status/{task_id}").json())["current_step"] < 1:
        assert time.monotonic() < deadline, f"training never made a step: {task}"
        time.sleep(0.1)
    return task_id, task


def test_disk_full_errors_are_told_apart_from_outages():
    import sqlite3

    import psycopg

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    pg_full = psycopg.errors.DiskFull("could not extend file: No space left on device")
    assert is_disk_full(OperationalError("INSERT ...", {}, pg_full))  # SQLSTATE 53100, as SQLAlchemy wraps it
    down = psycopg.OperationalError("connection refused")
    assert not is_disk_full(OperationalError("SELECT 1", {}, down))
    assert not is_disk_full(OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked")))
    try:  # a disk-full error behind another one (raise ... from)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)


def test_a_full_sqlite_disk_fails_the_task_at_once_through_the_reserve(tiny_disk):
    store = TaskStore(tiny_disk / "tasks.db")
    assert store.reserve.ensure() and store.reserve.path.stat().st_size == RESERVE_BYTES
    task = running_task(store)
    full = fill(tiny_disk)
    with pytest.raises(OperationalError) as caught:  # the real "database or disk is full" (SQLITE_FULL)
        store.add_event(task.id, "log", "x" * 20_000)
    assert is_disk_full(caught.value)
    started = time.monotonic()
    with pytest.raises(OperationalError):  # not waited on for 10 minutes as an outage would be
        retry_store(lambda: store.add_event(task.id, "log", "x" * 20_000), 600, "adding an event")
    assert time.monotonic() - started < 5
    # The outcome still lands: the store gives up its reserve and writes the status.
    assert store.move(task.id, TaskStatus.failed, (TaskStatus.running,), "failed", error=f"disk full: {full}")
    row = store.get(task.id)
    assert row.status == TaskStatus.failed and "No space left on device" in row.error and row.finished_at
    assert not store.reserve.path.exists() and store.disk_full_recently()
    assert not store.reserve.ensure()  # no room to take it back yet
    (tiny_disk / "filler").unlink()
    assert store.reserve.ensure()  # room again: the reserve is back for the next full disk


def test_a_worker_on_a_full_disk_records_its_failure_at_once(tiny_disk, monkeypatch, tiny_model_root):
    settings = disk_settings(tiny_disk, tiny_model_root)
    store = TaskStore(settings.database_url)
    store.reserve.ensure()
    task = running_task(store)

    def fills_the_disk(*_args: object) -> dict:
        raise fill(tiny_disk)  # the task's own write meets the full disk, then so does the store's

    monkeypatch.setitem(worker.HANDLERS, TaskKind.train, fills_the_disk)
    started = time.monotonic()
    assert worker.run_task(settings, task.id) == 1
    assert time.monotonic() - started < 10
    row = store.get(task.id)
    assert row.status == TaskStatus.failed
    assert "disk full" in row.error and "No space left on device" in row.error


def test_a_worker_that_cannot_record_exits_and_the_server_fails_the_task(tiny_disk, monkeypatch, tiny_model_root):
    settings = disk_settings(tiny_disk, tiny_model_root)
    store = TaskStore(settings.database_url)
    task = running_task(store)
    assert not store.reserve.path.exists()  # nothing made it: spent by an earlier full disk, say

    def fills_the_disk(*_args: object) -> dict:
        raise fill(tiny_disk)

    monkeypatch.setitem(worker.HANDLERS, TaskKind.train, fills_the_disk)
    started = time.monotonic()
    # A fresh SQLite store's WAL has no spare frames: on a full disk not even the bare status change fits.
    assert worker.run_task(settings, task.id) == worker.DISK_FULL_EXIT
    assert time.monotonic() - started < 10  # at once, not after the 10 minutes an outage is waited out
    assert store.get(task.id).status == TaskStatus.running
    # Space comes back; the server reaps the worker's disk-full exit and records the failure.
    (tiny_disk / "filler").unlink()
    runner = JobRunner(settings, store)
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({worker.DISK_FULL_EXIT})"])
    proc.wait()
    runner._running[task.id] = RunningJob(task.id, proc.pid, runner.log_path(task.id), proc)
    runner._reap()
    row = store.get(task.id)
    assert row.status == TaskStatus.failed and row.error.startswith(describe_exit(worker.DISK_FULL_EXIT))
    assert "disk full" in row.error and not runner._running and store.disk_full_recently()


def test_a_training_whose_disk_fills_up_fails_at_once_and_health_says_so(tiny_disk, tiny_model_root, monkeypatch):
    monkeypatch.setattr(tasks, "DISK_FULL_MEMORY_SECONDS", 1.0)  # /health's memory of a disk-full write
    settings = disk_settings(tiny_disk, tiny_model_root)
    with TestClient(create_app(settings)) as client:
        health = client.get("/health").json()
        assert (health["status"], health["disk"]) == ("ok", "ok"), health
        assert set(health["disk_free_mb"]) == {"data", "models", "store"}
        task_id, _ = train_until_first_step(client, settings, "outputs/full", max_steps=100_000)
        # The disk fills up under the running training: its next log line fails, and so does the task store's write
        # of that failure (a fresh store's WAL has no spare frames), which now takes the store's reserve.
        fill(tiny_disk)
        started = time.monotonic()
        task = wait_for(client, task_id, {"succeeded", "failed", "cancelled"}, timeout=90)
        assert time.monotonic() - started < 60  # not the 10 minutes a database outage is waited out
        assert task["status"] == "failed" and "disk full" in task["error"], task["error"]
        assert "No space left on device" in task["error"] or "database or disk is full" in task["error"]
        health = client.get("/health").json()
        assert health["jobs"]["active"] == 0  # the slot is free again
        assert (health["status"], health["disk"]) == ("degraded", "full"), health
        # Space is freed: the store takes its reserve back and /health is ok again.
        (tiny_disk / "filler").unlink()
        time.sleep(1.0)
        health = client.get("/health").json()
        assert (health["status"], health["disk"]) == ("ok", "ok"), health
        assert client.app.state.store.reserve.path.is_file()


# -- stalled workers ---------------------------------------------------------------------------------------------


@both_backends
def test_a_running_task_silent_past_stall_seconds_is_stalled(settings):
    store = TaskStore(settings.database_url)
    store.stall_seconds = 60
    task = running_task(store)
    store.update_progress(task.id, current_step=3, total_steps=10, eta_seconds=42.0)
    row = store.get(task.id)
    assert row.progress_at is not None and row.stalled_seconds is None and store.stalled_count() == 0
    assert TaskOut.model_validate(row).eta_seconds == 42.0
    with store.session() as s:  # the worker last reported progress 5 minutes ago
        s.execute(update(TaskRow).values(progress_at=utcnow() - timedelta(minutes=5)))
    row = store.get(task.id)
    out = TaskOut.model_validate(row)
    assert out.stalled and out.stalled_seconds >= 300 and out.eta_seconds is None
    assert store.stalled_count() == 1
    assert store.page()[0][0].stalled_seconds >= 300
    store.add_event(task.id, "log", "still here")  # an event is progress too
    assert store.get(task.id).stalled_seconds is None and store.stalled_count() == 0
    with store.session() as s:  # a task that never reported anything counts from its start
        s.execute(update(TaskRow).values(progress_at=None, started_at=utcnow() - timedelta(minutes=5)))
    assert store.get(task.id).stalled_seconds >= 300 and store.stalled_count() == 1
    store.move(task.id, TaskStatus.failed, (TaskStatus.running,), error="x")
    assert store.get(task.id).stalled_seconds is None and store.stalled_count() == 0  # only running tasks stall


def test_a_stopped_worker_shows_as_stalled_until_it_goes_on(settings):
    settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"stall_seconds": 3.0})})
    with TestClient(create_app(settings)) as client:
        task_id, task = train_until_first_step(client, settings, "outputs/stall", max_steps=10)
        assert not task["stalled"] and task["stalled_seconds"] is None
        pid = client.app.state.store.get(task_id).pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not (task := client.get(f"/api/train/status/{task_id}").json())["stalled"]:
                assert time.monotonic() < deadline, f"never reported stalled: {task}"
                time.sleep(0.3)
            assert task["status"] == "running" and task["stalled_seconds"] >= 3 and task["eta_seconds"] is None
            assert task["current_step"] < 10, "the training finished before it was stopped"
            while (health := client.get("/health").json())["stalled_tasks"] != 1:
                assert time.monotonic() < deadline, f"/health never reported the stalled task: {health}"
                time.sleep(0.3)
            assert health["status"] == "degraded"
            listed = client.get("/api/train/tasks").json()["items"]
            assert [t["stalled"] for t in listed] == [True]
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while (task := client.get(f"/api/train/status/{task_id}").json())["stalled"]:
            assert time.monotonic() < deadline, f"still stalled after SIGCONT: {task}"
            time.sleep(0.2)
        task = wait_for(client, task_id, {"succeeded", "failed", "cancelled"})
        assert task["status"] == "succeeded", task["error"]
        assert not task["stalled"]
        health = client.get("/health").json()
        deadline = time.monotonic() + 10
        while (health := client.get("/health").json())["stalled_tasks"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.3)
        assert health["status"] == "ok", health


# -- max_runs ----------------------------------------------------------------------------------------------------


def test_the_429_of_max_runs_says_when_to_retry(settings):
    settings = settings.model_copy(update={"runs": settings.runs.model_copy(update={"max_runs": 1})})
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/runs", json={"lora": {"r": 4, "alpha": 8}})
        assert first.status_code == 201, first.text
        try:
            r = client.post("/v1/runs", json={"lora": {"r": 4, "alpha": 8}})
            assert r.status_code == 429 and r.json()["error"]["type"] == "too_many_runs"
            assert r.headers["Retry-After"] == str(settings.jobs.retry_after_seconds)
        finally:
            client.delete(f"/v1/runs/{first.json()['id']}")
