"""The task store on SQLite and PostgreSQL: migrations, upgrading a store made before them, atomic limits, claiming."""

import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from pg import PgCluster, both_backends, create_database, with_database

from conftest import PROJECT_ROOT, SAMPLE, add_task, make_settings, wait_for
from controller.health import COUNTS_WAIT_AFTER_SECONDS
from entity.runs import RunRow, RunStatus
from entity.task import Base, SchedulerRow, TaskKind, TaskStatus, utcnow
from main import create_app
from service import jobs
from service.db import BASELINE_REVISION, current_revision, head_revision, make_engine
from service.jobs import JobRunner
from service.runs import RunStore
from service.tasks import QueueFullError, TaskStore
from util.errors import ConflictError, InvalidInputError

LEGACY_SCHEMA = PROJECT_ROOT / "test" / "data" / "legacy_tasks_schema.sql"


def _run_row(run_id: str, status: RunStatus, **fields: object) -> RunRow:
    """A run row with placeholder model fields (these tests exercise the store, not a worker)."""
    now = utcnow()
    base = {"base_model": "m", "base_path": "/m", "lora": {}, "seed": 0, "vocab_size": 8, "resume_optimizer": 1}
    return RunRow(
        id=run_id, status=status, pending_grads=0, steps=0, created_at=now, last_used_at=now, **base, **fields
    )


def test_migrations_build_exactly_the_models_schema(store_url):
    store = TaskStore(store_url)
    assert current_revision(store.engine) == head_revision()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_store_made_before_migrations_upgrades_in_place(tmp_path):
    db = tmp_path / "tasks.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(LEGACY_SCHEMA.read_text())
        conn.execute(
            "INSERT INTO tasks (id, kind, status, request, progress, current_step, created_at, finished_at, metrics)"
            " VALUES ('a' , 'train', 'succeeded', '{\"x\": 1}', 100.0, 6, '2026-11-24 10:00:00.000000',"
            " '2026-11-24 10:05:00.000000', '{\"loss\": 0.5}')"
        )
        conn.execute(
            "INSERT INTO tasks (id, kind, status, request, progress, current_step, created_at)"
            " VALUES ('b', 'eval', 'queued', '{}', 0.0, 0, '2026-11-24 11:00:00.000000')"
        )
        conn.execute(
            "INSERT INTO task_events (task_id, created_at, type, level, message) "
            "VALUES ('a', '2026-11-24 10:05:00.000000', 'status', 'info', 'succeeded')"
        )
        conn.execute(
            "INSERT INTO runs (id, status, base_model, base_path, lora, seed, vocab_size, resume_optimizer,"
            " pending_grads, steps, created_at, last_used_at) VALUES ('r1', 'paused', 'm', '/m', '{}', 0, 8, 1, 0, 3,"
            " '2026-11-24 10:00:00.000000', '2026-11-24 10:00:00.000000')"
        )
        conn.execute(
            "INSERT INTO run_jobs (id, run_id, kind, status, request, result, created_at) VALUES"
            " ('j1', 'r1', 'optim_step', 'completed', '{}', '{\"step\": 3}', '2026-11-24 10:00:00.000000')"
        )
    store = TaskStore(db)
    assert current_revision(store.engine) == head_revision() != BASELINE_REVISION
    old = store.get("a")
    assert (old.status, old.request, old.metrics, old.current_step) == ("succeeded", {"x": 1}, {"loss": 0.5}, 6)
    assert old.created_at.tzinfo is not None and old.owner is None and old.cancel_requested is False
    assert [e.message for e in store.events("a")] == ["succeeded"]
    runs = RunStore(store.engine)  # the runs tables were rebuilt (wider ids): their rows and links stay
    assert runs.get_run("r1").steps == 3 and runs.get_job("j1").result == {"step": 3}
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    claimed = store.claim_next("me")  # the old queued task runs on the upgraded store
    assert claimed is not None and claimed.id == "b" and store.get("b").owner == "me"
    assert TaskStore(db).counts()["total"] == 2  # opening it again changes nothing


def test_a_bad_database_url_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="sqlite:// or postgresql"):
        make_engine("mysql://x@127.0.0.1/db")


def test_limits_hold_under_8_concurrent_creates(store_url):
    store = TaskStore(store_url)
    barrier = threading.Barrier(8)

    def create(i: int) -> str:
        barrier.wait()
        try:
            store.create(TaskKind.train, {"i": i}, output_dir="/out/same" if i % 2 else None, max_queued=3)
            return "ok"
        except ConflictError:
            return "busy"
        except QueueFullError:
            return "full"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert results.count("ok") == 3, results
    assert store.counts()["queued"] == 3
    assert len(store.active_with_output("/out/same")) <= 1


def test_concurrent_claims_take_each_task_exactly_once(store_url):
    store = TaskStore(store_url)
    ids = {store.create(TaskKind.eval, {"n": n}).id for n in range(24)}
    schedulers = [TaskStore(store_url) for _ in range(2)]  # two processes' worth of engines
    claims: list[tuple[str, str]] = []
    barrier = threading.Barrier(8)

    def claim_all(k: int) -> None:
        owner = f"s{k % 2}"
        barrier.wait()
        while (task := schedulers[k % 2].claim_next(owner)) is not None:
            claims.append((task.id, owner))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(claim_all, range(8)))
    assert sorted(i for i, _ in claims) == sorted(ids)
    for task_id, owner in claims:
        row = store.get(task_id)
        assert (row.status, row.owner) == (TaskStatus.running, owner) and row.started_at is not None
    assert store.claim_next("late") is None


def test_claim_respects_fits_and_a_cancel(store_url):
    store = TaskStore(store_url)
    first = store.create(TaskKind.train, {"big": True})
    second = store.create(TaskKind.train, {})
    assert store.claim_next("a", fits=lambda t: not t.request.get("big")) is None  # nothing jumps the queue
    assert store.get(first.id).status == TaskStatus.queued
    assert store.transition(first.id, TaskStatus.cancelled, (TaskStatus.queued,))
    assert store.claim_next("a").id == second.id


def test_two_job_runners_on_one_store_never_start_the_same_task(settings, store_url, monkeypatch):
    started: list[tuple[str, str]] = []

    def fake_spawn(settings_, args, log_path):
        started.append((args[args.index("--task-id") + 1], settings_.jobs.scheduler_id))
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(jobs, "spawn_worker", fake_spawn)
    runners = []
    for name in ("left", "right"):
        jobs_settings = settings.jobs.model_copy(update={"scheduler_id": name, "max_concurrent_jobs": 3})
        runners.append(
            JobRunner(
                with_database(settings, store_url).model_copy(update={"jobs": jobs_settings}), TaskStore(store_url)
            )
        )
    store = TaskStore(store_url)
    ids = [runners[n % 2].submit(TaskKind.eval, {"n": n}).id for n in range(12)]
    barrier = threading.Barrier(2)

    def drive(runner: JobRunner) -> None:
        barrier.wait()
        for _ in range(40):
            runner.tick()
            if not store.with_status(TaskStatus.queued):
                break

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(drive, runners))
    for runner in runners:
        for job in runner._running.values():
            job.proc.wait()
        runner.tick()  # reap
    assert sorted(t for t, _ in started) == sorted(ids)  # each task started once, by one of the two
    owners = {store.get(t).owner for t in ids}
    assert owners <= {"left", "right"}
    for task_id in ids:
        running_events = [e for e in store.events(task_id) if (e.data or {}).get("status") == "running"]
        assert len(running_events) == 1


def test_a_scheduler_recovers_only_its_own_tasks(settings, store_url):
    def runner(name: str) -> JobRunner:
        jobs_settings = settings.jobs.model_copy(update={"scheduler_id": name})
        return JobRunner(with_database(settings, store_url).model_copy(update={"jobs": jobs_settings}), store)

    store = TaskStore(store_url)
    mine = store.create(TaskKind.eval, {})
    assert store.claim_next("server-a").id == mine.id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.set_pid(mine.id, dead.pid)
    runner("server-b").recover()  # another server starting leaves server-a's task alone
    assert store.get(mine.id).status == TaskStatus.running
    runner("server-a").recover()  # server-a restarting applies the adopt-or-fail rule to it
    row = store.get(mine.id)
    assert row.status == TaskStatus.failed and row.error == jobs.RESTART_ERROR


def test_a_server_adopts_or_fails_only_its_own_runs(settings, store_url):
    from service.runs import RunService

    def service(name: str) -> RunService:
        jobs_settings = settings.jobs.model_copy(update={"scheduler_id": name})
        return RunService(with_database(settings, store_url).model_copy(update={"jobs": jobs_settings}), store)

    store = TaskStore(store_url)
    runs = service("server-a").store
    runs.add_run(_run_row("r1", RunStatus.ready, pid=2**22 + 7, owner="server-a"))
    other = service("server-b")
    other.start()
    other.stop()
    assert runs.get_run("r1").status == RunStatus.ready  # another server starting leaves it alone
    own = service("server-a")
    own.start()
    own.stop()
    assert runs.get_run("r1").status == RunStatus.failed  # its own server's restart: the worker is gone


def test_a_cancel_sent_while_the_owner_was_down_is_carried_out_when_it_restarts(settings, store_url):
    from test_tasks import fake_worker, spawn_ready

    store = TaskStore(store_url)
    task = store.create(TaskKind.eval, {})
    assert store.claim_next("server-a").id == task.id
    proc = spawn_ready(fake_worker(task.id), start_new_session=True)
    try:
        store.set_pid(task.id, proc.pid)
        assert store.request_cancel(task.id)  # through server-b while server-a is down
        jobs_settings = settings.jobs.model_copy(update={"scheduler_id": "server-a", "cancel_grace_seconds": 1.0})
        JobRunner(with_database(settings, store_url).model_copy(update={"jobs": jobs_settings}), store).recover()
        assert proc.wait(timeout=10) is not None
        row = store.get(task.id)
        assert row.status == TaskStatus.cancelled and not row.cancel_requested
    finally:
        proc.kill()
        proc.wait()


@both_backends
def test_fine_tuning_jobs_filter_on_json_metadata(client):
    def job(team: str | None) -> str:
        meta = {
            "model": "m",
            "training_file": "file-x",
            "seed": 1,
            "method": "supervised",
            "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
            "metadata": {"team": team, "odd key, {with} commas": "v"} if team else None,
        }
        return add_task(client, TaskStatus.failed, None, request={"openai": meta})

    search, other, plain = job("search"), job("ads"), job(None)
    add_task(client, TaskStatus.failed, None)  # a train task that is no fine-tuning job
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert {j["id"].removeprefix("ftjob-") for j in listed} == {search, other, plain}
    found = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "search"}).json()["data"]
    assert [j["id"] for j in found] == [f"ftjob-{search}"]
    odd = client.get("/v1/fine_tuning/jobs", params={"metadata[odd key, {with} commas]": "v"}).json()["data"]
    assert {j["id"] for j in odd} == {f"ftjob-{search}", f"ftjob-{other}"}


def test_a_tinker_length_run_id_fits_on_both_backends(store_url):
    store = TaskStore(store_url)
    runs = RunStore(store.engine)
    run_id = f"{'s' * 40}:train:{2**63}"  # the longest session id the Tinker API accepts, a 64-bit sequence number
    runs.add_run(_run_row(run_id, RunStatus.starting))
    job = runs.add_job(run_id, "sample", {})
    assert runs.get_job(job.id).run_id == run_id and runs.get_run(run_id).status == RunStatus.starting


def test_one_live_process_per_scheduler_id(store_url):
    store = TaskStore(store_url)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        store.register_scheduler("api", "host-1", other.pid, 60, alive=jobs.pid_alive)
        store.register_scheduler("api", "host-1", other.pid, 60, alive=jobs.pid_alive)  # itself again: fine
        with pytest.raises(ConflictError, match=r"jobs\.scheduler_id"):  # a second live server with that name
            store.register_scheduler("api", "host-1", 1, 60, alive=jobs.pid_alive)
    finally:
        other.kill()
        other.wait()
    store.register_scheduler("api", "host-1", 1, 60, alive=jobs.pid_alive)  # the first one died: taken over
    with pytest.raises(ConflictError):  # on another host only the heartbeat tells: still fresh
        store.register_scheduler("api", "host-2", 7, 60, alive=jobs.pid_alive)
    store.register_scheduler("api", "host-2", 7, 0, alive=jobs.pid_alive)  # unseen past the limit: gone
    store.unregister_scheduler("api", 7)
    store.register_scheduler("api", "host-1", 1, 60, alive=jobs.pid_alive)  # a clean stop frees the name


def test_a_second_server_with_the_same_scheduler_id_is_refused(settings, store_url):
    from fastapi.testclient import TestClient

    from main import create_app

    settings = with_database(settings, store_url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        store = client.app.state.store
        me = client.app.state.runner.owner
        with store.session() as s:  # as if another live process held the same name
            s.execute(SchedulerRow.__table__.update().values(pid=os.getppid()))
        runner = JobRunner(settings, TaskStore(store_url))
        with pytest.raises(ConflictError, match=me):
            runner.start()
        with store.session() as s:
            s.execute(SchedulerRow.__table__.update().values(pid=os.getpid()))
    engine = TaskStore(store_url).engine
    with engine.connect() as conn:  # the server's clean stop freed its name
        assert conn.exec_driver_sql("SELECT count(*) FROM schedulers").scalar() == 0
    engine.dispose()


def test_a_database_outage_answers_503_and_the_server_recovers_with_it(tmp_path, tiny_model_root):
    cluster = PgCluster()  # its own server: this test stops it
    cluster.start()
    try:
        settings = with_database(make_settings(tmp_path, tiny_model_root), create_database(cluster.url))
        with TestClient(create_app(settings)) as client:
            assert client.get("/api/train/tasks").status_code == 200
            cluster.stop()
            for response in (
                client.get("/api/train/tasks"),
                client.post("/v1/runs", json={}),
            ):
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] == "5"
                error = response.json()["error"]
                assert error["type"] == "store_unavailable" and "retry" in error["message"].lower()
                assert str(cluster.port) not in response.text and "SELECT" not in response.text  # no driver text
            health = client.get("/health")  # the process stays up and says what is wrong
            assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
            assert health.json()["store"] == "unavailable"
            cluster.start()
            assert client.get("/api/train/tasks").status_code == 200  # the pool reconnects without a restart
            time.sleep(COUNTS_WAIT_AFTER_SECONDS)
            assert client.get("/health").json()["status"] == "ok"
            assert client.post("/v1/runs", json={}).status_code == 201
    finally:
        cluster.remove()


def test_a_task_trains_through_a_database_outage_and_its_outcome_lands_after_it(tmp_path, tiny_model_root):
    cluster = PgCluster()
    cluster.start()
    try:
        settings = with_database(make_settings(tmp_path, tiny_model_root), create_database(cluster.url))
        with TestClient(create_app(settings)) as client:
            up = client.post("/api/data/upload", files={"file": ("s.json", SAMPLE.read_bytes())})
            assert up.status_code == 201, up.text
            config = {"max_steps": 40, "per_device_train_batch_size": 1, "save_steps": 1000, "logging_steps": 1}
            r = client.post(
                "/api/train/start", json={"strategy": "lora", "dataset_path": "uploads/s.json", "config": config}
            )
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]
            store = client.app.state.store
            deadline = time.monotonic() + 120
            while (row := store.get(task_id)).current_step < 2:  # training, and reporting each step
                assert time.monotonic() < deadline and row.status in ("queued", "running"), (row.status, row.error)
                time.sleep(0.1)
            cluster.stop()  # the worker's reports fail from here on; the scheduler's passes too
            time.sleep(4)
            assert client.get(f"/api/train/status/{task_id}").status_code == 503
            cluster.start()
            task = wait_for(client, task_id, {"succeeded", "failed", "cancelled"})
            assert task["status"] == "succeeded", task["error"]
            assert task["metrics"]["global_step"] == 40 and task["progress"] == 100.0
            log = (settings.data_dir / "logs" / f"{task_id}.log").read_text()
            # it trained through the outage (reports dropped), or finished in it and waited to record the outcome
            assert "task store unavailable" in log, log[-3000:]
            statuses = [
                e["data"]["status"]
                for e in client.get(f"/api/train/logs/{task_id}").json()["items"]
                if e["type"] == "status"
            ]
            assert statuses[-1] == "succeeded"
    finally:
        cluster.remove()


def test_a_run_keeps_its_weights_through_a_database_outage(tmp_path, tiny_model_root):
    cluster = PgCluster()
    cluster.start()
    example = {"input_ids": [11, 220, 3056, 1092], "target_ids": [220, 3056, 1092, 5078], "weights": [1.0] * 4}
    try:
        settings = with_database(make_settings(tmp_path, tiny_model_root), create_database(cluster.url))
        with TestClient(create_app(settings)) as client:

            def call(run_id: str, primitive: str, body: dict) -> dict:
                r = client.post(f"/v1/runs/{run_id}/{primitive}", json=body)
                assert r.status_code == 202, r.text
                job = client.get(f"/v1/jobs/{r.json()['job_id']}", params={"wait": True, "timeout": 120}).json()
                assert job["status"] == "completed", job
                return job["result"]

            r = client.post("/v1/runs", json={"lora": {"r": 4}, "seed": 1})
            assert r.status_code == 201, r.text
            run_id = r.json()["id"]
            call(run_id, "forward_backward", {"examples": [example]})
            call(run_id, "optim_step", {"learning_rate": 1e-2})
            loss = call(run_id, "forward_backward", {"examples": [example]})["loss"]
            cluster.stop()  # the worker's polls fail from here on; it must wait, not die with the weights
            time.sleep(3)
            assert client.post(f"/v1/runs/{run_id}/forward_backward", json={"examples": [example]}).status_code == 503
            cluster.start()
            run = client.get(f"/v1/runs/{run_id}").json()
            assert run["status"] == "ready" and run["steps"] == 1, run
            # the same weights as before the outage: the same loss on the same example (no step in between)
            assert call(run_id, "forward_backward", {"examples": [example]})["loss"] == pytest.approx(loss, abs=1e-6)
            log = (settings.data_dir / "logs" / f"run-{run_id}.log").read_text()
            assert "task store unavailable" in log, log[-3000:]
    finally:
        cluster.remove()
