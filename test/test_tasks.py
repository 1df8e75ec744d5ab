"""Task store and job runner on SQLite and PostgreSQL: atomic transitions, restart recovery, queue order, exits."""

import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from pg import both_backends

from entity.task import TaskKind, TaskStatus, utcnow
from main import create_app
from service.jobs import RESTART_ERROR, RunningJob, describe_exit, is_worker_of, process_start
from service.tasks import TaskStore


def test_transitions_are_conditional(store_url):
    store = TaskStore(store_url)
    task = store.create(TaskKind.train, {"x": 1})
    assert store.get(task.id).status == TaskStatus.queued
    assert store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
    assert not store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
    assert store.transition(task.id, TaskStatus.cancelled, (TaskStatus.running,))
    # A worker finishing after a cancel must not overwrite it.
    assert not store.transition(task.id, TaskStatus.succeeded, (TaskStatus.running,))
    row = store.get(task.id)
    assert row.status == TaskStatus.cancelled and row.started_at and row.finished_at


def test_page_filters_and_orders_newest_first(store_url):
    store = TaskStore(store_url)
    ids = [store.create(TaskKind.train, {}).id for _ in range(3)]
    other = store.create(TaskKind.eval, {}).id
    rows, total = store.page(kind=TaskKind.train, limit=2)
    assert total == 3 and [r.id for r in rows] == ids[::-1][:2]
    rows, total = store.page(limit=10, offset=1)
    assert total == 4 and other not in [r.id for r in rows]
    assert store.counts()["queued"] == 4


def test_events_after_id(store_url):
    store = TaskStore(store_url)
    task = store.create(TaskKind.train, {})
    first = store.add_event(task.id, "log", "a")
    store.add_event(task.id, "log", "b")
    assert [e.message for e in store.events(task.id, after=first)] == ["b"]


@both_backends
def test_restart_fails_orphaned_running_tasks_and_resumes_queue(settings):
    store = TaskStore(settings.database_url)
    orphan = store.create(TaskKind.train, {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.transition(orphan.id, TaskStatus.running, (TaskStatus.queued,))
    store.set_pid(orphan.id, dead.pid)
    waiting = store.create(TaskKind.train, {"not": "a train request"})
    with TestClient(create_app(settings)) as client:
        task = client.get(f"/api/train/status/{orphan.id}").json()
        assert task["status"] == "failed"
        assert task["error"] == RESTART_ERROR
        # The queued task is still picked up after the restart (and fails on its bad request).
        deadline = time.monotonic() + 60
        while (queued := client.get(f"/api/train/status/{waiting.id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert queued["status"] == "failed"
        assert "KeyError" in queued["error"]


@both_backends
def test_restart_adopts_a_live_worker_which_can_be_cancelled(settings):
    store = TaskStore(settings.database_url)
    task = store.create(TaskKind.train, {})
    store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))  # claimed first, as the runner does
    proc = spawn_ready(fake_worker(task.id), start_new_session=True)
    try:
        store.set_pid(task.id, proc.pid)
        with TestClient(create_app(settings)) as client:
            assert client.get(f"/api/train/status/{task.id}").json()["status"] == "running"
            assert client.get("/health").json()["jobs"]["active"] == 1
            r = client.post(f"/api/train/cancel/{task.id}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGTERM
    finally:
        proc.kill()


def fake_worker(ident: str, flag: str = "--task-id", module: str = "service.worker") -> list[str]:
    """A sleeping process whose command line ends like a real worker's (`-m <module> <flag> <id>`)."""
    return [sys.executable, "-c", "import time; time.sleep(60)", "-m", module, flag, ident]


def spawn_ready(argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen, returning once the child has exec'd (until then /proc shows the parent's command line)."""
    proc = subprocess.Popen(argv, **kwargs)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[-2:-1] != [argv[-1].encode()]:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    return proc


def test_is_worker_of_checks_the_command_line():
    proc = spawn_ready(fake_worker("marker-abc"))
    try:
        assert is_worker_of(proc.pid, "marker-abc")
        assert not is_worker_of(proc.pid, "another-task")
        assert not is_worker_of(proc.pid, "marker-abc", flag="--run-id")  # a task worker is not a run worker
    finally:
        proc.kill()
        proc.wait()
    assert not is_worker_of(proc.pid, "marker-abc")


def test_is_worker_of_refuses_a_process_that_only_mentions_the_id():
    # e.g. `tail -f logs/<id>.log` or an editor: the id is in its command line, but it is not the worker.
    proc = spawn_ready([sys.executable, "-c", "import time; time.sleep(60)", "--task-id", "marker-abc", "x"])
    try:
        assert not is_worker_of(proc.pid, "marker-abc")
    finally:
        proc.kill()
        proc.wait()


def test_is_worker_of_refuses_a_process_older_than_the_task():
    proc = spawn_ready(fake_worker("marker-abc"))
    try:
        time.sleep(1.5)
        started = utcnow()  # the task was claimed after this process began: it cannot be the task's worker
        assert not is_worker_of(proc.pid, "marker-abc", started)
        assert is_worker_of(proc.pid, "marker-abc", started - timedelta(seconds=5))
        assert is_worker_of(proc.pid, "marker-abc", (started - timedelta(seconds=5)).replace(tzinfo=None))
    finally:
        proc.kill()
        proc.wait()


@both_backends
def test_restart_does_not_adopt_a_reused_or_foreign_pid(settings):
    store = TaskStore(settings.database_url)
    reused = store.create(TaskKind.train, {})
    foreign = store.create(TaskKind.train, {})
    # A process with the exact worker command line that predates the task (a pid reused by an older look-alike),
    # and a process that merely names the other task's id.
    older = spawn_ready(fake_worker(reused.id), start_new_session=True)
    time.sleep(1.5)
    store.transition(reused.id, TaskStatus.running, (TaskStatus.queued,))
    store.set_pid(reused.id, older.pid)
    store.transition(foreign.id, TaskStatus.running, (TaskStatus.queued,))
    mention = spawn_ready(
        [sys.executable, "-c", "import time; time.sleep(60)", f"logs/{foreign.id}.log"], start_new_session=True
    )
    store.set_pid(foreign.id, mention.pid)
    try:
        with TestClient(create_app(settings)) as client:
            for task in (reused, foreign):
                body = client.get(f"/api/train/status/{task.id}").json()
                assert body["status"] == "failed" and body["error"] == RESTART_ERROR
            assert client.get("/health").json()["jobs"]["active"] == 0
        # Neither process was signalled: they are not ours.
        assert older.poll() is None and mention.poll() is None
    finally:
        for proc in (older, mention):
            proc.kill()
            proc.wait()


def test_describe_exit():
    assert describe_exit(3) == "worker process exited with code 3"
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "memory" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)


def test_an_adopted_worker_whose_pid_now_belongs_to_another_process_has_ended(tmp_path):
    proc = spawn_ready(fake_worker("marker-abc"))
    try:
        started = process_start(proc.pid)
        assert started is not None
        assert RunningJob("t", proc.pid, tmp_path / "t.log", started=started).end_reason() is None
        # The pid is alive, but the process holding it began later than the adopted worker did: a reused pid.
        reused = RunningJob("t", proc.pid, tmp_path / "t.log", started=started - 10)
        assert "ended" in (reused.end_reason() or "")
    finally:
        proc.kill()
        proc.wait()
