"""The task database is the server's alone: no client path reaches it, and an old install's copy moves out of data/.

Opening and closing the SQLite file from the server process (a preview, a validate, a train dataset) drops the
server's POSIX locks; the next worker to exit then deleted the live WAL and later tasks were lost. The reproduction
below ran that probe, then tasks, then kill -9 and a restart.
"""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import SAMPLE, make_settings, start_server, stop_server
from entity.task import TaskRow, TaskStatus, utcnow
from main import create_app
from service.tasks import TaskStore

FAST = {"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 1}


def _server(workdir: Path, model_root: Path, db_path: str | None) -> tuple[str, object]:
    """A real server whose DB is at the default place (db_path None) or a custom one (relative to the config)."""
    paths = {"data_dir": str(workdir / "data"), "model_dir": str(model_root)}
    if db_path is not None:
        paths["db_path"] = db_path
    return start_server(workdir, model_root, {"paths": paths})


def _train(url: str) -> str:
    """Run a one-step LoRA task to its end; return its id."""
    r = httpx.post(
        f"{url}/api/train/start",
        json={"strategy": "lora", "dataset_path": "uploads/train_sample.json", "config": FAST},
    )
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        task = httpx.get(f"{url}/api/train/status/{task_id}").json()
        if task["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.3)
    assert task["status"] == "succeeded", task
    return task_id


@pytest.mark.parametrize("db_path", [None, "data/tasks.db"], ids=["default-place", "custom-inside-data"])
def test_probing_the_task_database_is_refused_and_loses_no_task(tmp_path, tiny_model_root, db_path):
    model_root = tmp_path / "model"
    model_root.mkdir()
    (model_root / "base").symlink_to(tiny_model_root / "base", target_is_directory=True)
    url, proc = _server(tmp_path, model_root, db_path)
    db = tmp_path / (db_path or "state/tasks.db")
    try:
        assert db.is_file()
        up = httpx.post(f"{url}/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
        assert up.status_code == 201, up.text
        first = _train(url)
        # A hard link planted in the data dir is the same file under another name: refused by inode.
        os.link(db, tmp_path / "data" / "linked.jsonl")
        names = [str(db), "linked.jsonl", f"{db}-wal", f"{db}-shm", f"{db}-journal", f"{db}.migrate.lock"]
        if db_path is not None:
            names += ["tasks.db", "./uploads/../tasks.db", "tasks.db-wal"]
        names += ["logs", f"logs/{first}.log", "uploads/.wintrain-output.json"]
        for name in names:
            probes = [
                httpx.get(f"{url}/api/data/preview", params={"file_path": name, "limit": 1}),
                httpx.post(f"{url}/api/data/validate", json={"file_path": name}),
                httpx.post(f"{url}/api/train/start", json={"strategy": "lora", "dataset_path": name}),
            ]
            for r in probes:
                assert r.status_code == 403, (name, r.status_code, r.text)
                assert str(tmp_path) in name or str(tmp_path) not in r.text  # no server path but the client's own
        listed = httpx.get(f"{url}/api/data/files").json()["items"]
        assert not any("tasks.db" in f["file_path"] or f["file_path"] == "linked.jsonl" for f in listed)
        after = [_train(url)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    url, proc = _server(tmp_path, model_root, db_path)
    try:
        ids = {t["id"] for t in httpx.get(f"{url}/api/train/tasks", params={"limit": 50}).json()["items"]}
        assert {first, *after} <= ids
        assert httpx.get(f"{url}/api/train/status/{after[-1]}").json()["status"] == "succeeded"
    finally:
        stop_server(proc)


def _legacy_store(data_dir: Path, status: TaskStatus) -> str:
    """A task database at the old default place (data/tasks.db) holding one task in `status`; return its id."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = TaskStore(data_dir / "tasks.db")
    task_id = store.new_id()
    with store.session() as s:
        s.add(TaskRow(id=task_id, kind="train", status=status, request={}, created_at=utcnow()))
    store.engine.dispose()
    return task_id


def _default_place(tmp_path: Path, tiny_model_root: Path):
    """Test settings whose task database is at the default place relative to the data dir's parent."""
    settings = make_settings(tmp_path, tiny_model_root)
    paths = settings.paths.model_copy(update={"db_path": tmp_path / "state" / "tasks.db"})
    return settings.model_copy(update={"paths": paths})


def test_an_old_install_database_moves_out_of_the_data_dir(tmp_path, tiny_model_root):
    settings = _default_place(tmp_path, tiny_model_root)
    task_id = _legacy_store(settings.data_dir, TaskStatus.succeeded)
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/api/train/status/{task_id}").json()["status"] == "succeeded"
        assert client.get("/api/data/preview", params={"file_path": "tasks.db"}).status_code == 404
    assert (tmp_path / "state" / "tasks.db").is_file()
    assert not any(p.name.startswith("tasks.db") for p in settings.data_dir.iterdir())


def test_an_old_database_with_a_running_task_stays_put_and_closed_to_clients(tmp_path, tiny_model_root):
    settings = _default_place(tmp_path, tiny_model_root)
    task_id = _legacy_store(settings.data_dir, TaskStatus.running)
    with TestClient(create_app(settings)) as client:
        # Its worker (gone here, so the restart fails the task) would still be writing to the old file.
        assert client.get(f"/api/train/status/{task_id}").status_code == 200
        r = client.get("/api/data/preview", params={"file_path": "tasks.db"})
        assert r.status_code == 403, r.text
    assert (settings.data_dir / "tasks.db").is_file()
    assert not (tmp_path / "state" / "tasks.db").exists()
    with TestClient(create_app(settings)) as client:  # no task runs now: this start moves it
        assert client.get(f"/api/train/status/{task_id}").json()["status"] == "failed"
    assert (tmp_path / "state" / "tasks.db").is_file() and not (settings.data_dir / "tasks.db").exists()


def test_tilde_paths_are_plain_names(client):
    for raw in ("~nosuchuser/x.jsonl", "~/x.jsonl", "~"):
        r = client.get("/api/data/preview", params={"file_path": raw})
        assert r.status_code in (403, 404), r.text
