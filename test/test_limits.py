"""Limits that must hold when requests arrive at once: max_runs, one task per output folder, the task queue."""

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import write_jsonl
from main import create_app
from util.settings import Settings

CONCURRENT = 8


def at_once(call: Callable[[int], httpx.Response], n: int = CONCURRENT) -> list[httpx.Response]:
    """Run `call(i)` for i in range(n) in n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def go(i: int) -> httpx.Response:
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def _with(settings: Settings, section: str, **values: object) -> Settings:
    """A copy of settings with some values of one section replaced."""
    current = getattr(settings, section)
    return settings.model_copy(update={section: current.model_copy(update=values)})


@pytest.fixture
def paused_client(settings: Settings, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """A client whose scheduler is stopped, so every submitted task stays queued (and costs no CPU)."""
    max_queued = getattr(request, "param", 3)
    with TestClient(create_app(_with(settings, "jobs", max_queued=max_queued))) as c:
        c.app.state.runner.stop()
        write_jsonl(settings.data_dir / "train.jsonl", _conversations())
        yield c


def _conversations() -> list[dict]:
    """A few valid chat records."""
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    return [{"messages": turn} for _ in range(4)]


def _train(client: TestClient, output_dir: str) -> httpx.Response:
    """POST a small LoRA train request writing to `output_dir`."""
    body = {"strategy": "lora", "dataset_path": "train.jsonl", "output_dir": output_dir, "config": {"max_steps": 1}}
    return client.post("/api/train/start", json=body)


@pytest.mark.parametrize("paused_client", [100], indirect=True)
def test_one_active_task_per_output_dir_under_concurrency(paused_client):
    rounds = 3  # the race is a matter of timing: several bursts make a non-atomic check fail reliably
    for n in range(rounds):
        answers = at_once(lambda _: _train(paused_client, f"outputs/shared-{n}"))  # noqa: B023 - used at once
        codes = Counter(r.status_code for r in answers)
        assert codes == {202: 1, 409: CONCURRENT - 1}, [r.text for r in answers]
        refused = next(r for r in answers if r.status_code == 409).json()["error"]
        assert refused["type"] == "conflict" and "already writing" in refused["message"]
    queued = paused_client.get("/api/train/tasks", params={"status": "queued"}).json()
    assert queued["total"] == rounds


def test_max_queued_holds_under_concurrency(paused_client):
    answers = at_once(lambda i: _train(paused_client, f"outputs/run-{i}"))
    codes = Counter(r.status_code for r in answers)
    assert codes == {202: 3, 429: CONCURRENT - 3}, [r.text for r in answers]
    full = next(r for r in answers if r.status_code == 429)
    assert full.headers["Retry-After"] == "30"
    assert full.json()["error"]["type"] == "queue_full"
    assert full.json()["error"]["details"] == {"max_queued": 3, "queued": 3}
    # A finished (cancelled) task frees its place in the queue.
    task_id = next(r for r in answers if r.status_code == 202).json()["task_id"]
    assert paused_client.post(f"/api/train/cancel/{task_id}").status_code == 200
    assert _train(paused_client, "outputs/after-cancel").status_code == 202
    assert _train(paused_client, "outputs/one-too-many").status_code == 429


def test_max_runs_holds_under_concurrency(settings):
    with TestClient(create_app(_with(settings, "runs", max_runs=2))) as client:
        answers = at_once(lambda _: client.post("/v1/runs", json={"lora": {"r": 4, "alpha": 8}}))
        codes = Counter(r.status_code for r in answers)
        created = [r.json()["id"] for r in answers if r.status_code == 201]
        try:
            assert codes == {201: 2, 429: CONCURRENT - 2}, [r.text for r in answers]
            assert next(r for r in answers if r.status_code == 429).json()["error"]["type"] == "too_many_runs"
            live = [r for r in client.get("/v1/runs").json()["items"] if r["status"] in ("starting", "ready")]
            assert len(live) == 2
        finally:
            for run_id in created:
                client.delete(f"/v1/runs/{run_id}")


# -- bounds -------------------------------------------------------------------------------------------------


def test_num_gpus_on_cpu_is_capped_at_the_core_count(paused_client):
    from service.jobs import usable_cores

    cores = usable_cores()
    body = {"strategy": "lora", "dataset_path": "train.jsonl", "config": {"max_steps": 1, "num_gpus": cores + 1}}
    r = paused_client.post("/api/train/start", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"] == {"num_gpus": cores + 1, "cpu_processes": cores}
    assert f"this server has room for {cores}" in r.json()["error"]["message"]


def test_wait_true_gives_up_after_the_server_timeout_with_the_task_as_it_stands(settings):
    with TestClient(create_app(_with(settings, "jobs", wait_timeout_seconds=0.3))) as client:
        client.app.state.runner.stop()  # nothing will run: the wait can only end by the timeout
        write_jsonl(settings.data_dir / "train.jsonl", _conversations())
        r = client.post("/api/eval/evaluate", json={"dataset_path": "train.jsonl", "metrics": ["loss"], "wait": True})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued" and r.json()["task"]["status"] == "queued"
        r = client.post("/api/export/archive", json={"wait": True})
        assert r.status_code == 202, r.text
        assert r.json()["task"]["id"] == r.json()["task_id"] and r.json()["task"]["status"] == "queued"


def test_retention_drops_old_events_and_logs_but_keeps_tasks(client, settings):
    import os
    import time
    from datetime import timedelta

    from conftest import add_task
    from entity.task import TaskRow, TaskStatus, utcnow

    store, runner = client.app.state.store, client.app.state.runner
    old = add_task(client, TaskStatus.succeeded, None)
    recent = add_task(client, TaskStatus.failed, None)
    with store.session() as s:
        s.get(TaskRow, old).finished_at = utcnow() - timedelta(days=31)
    for task_id in (old, recent):
        store.add_event(task_id, "log", "a line")
        runner.log_path(task_id).write_text("log\n")
    month_ago = time.time() - 31 * 86400
    os.utime(runner.log_path(old), (month_ago, month_ago))
    assert runner.purge_expired() == 1
    assert store.events(old) == [] and len(store.events(recent)) == 1
    assert not runner.log_path(old).exists() and runner.log_path(recent).exists()
    assert client.get(f"/api/train/status/{old}").json()["status"] == "succeeded"
    # In 30 days the recent one expires too; with no retention nothing ever does.
    assert runner.purge_expired(now=time.time() + 31 * 86400) == 1
    assert store.events(recent) == []


def _records(n: int) -> list[dict]:
    """`n` distinct valid chat records."""
    return [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(n)
    ]


def test_validate_refuses_a_file_over_the_size_limit(settings):
    with TestClient(create_app(_with(settings, "data", max_validate_mb=0.01))) as client:
        write_jsonl(settings.data_dir / "big.jsonl", _records(200))  # about 20 kB
        r = client.post("/api/data/validate", json={"file_path": "big.jsonl"})
        assert r.status_code == 422, r.text
        assert "data.max_validate_mb" in r.json()["error"]["message"]


def test_validate_time_limit_answers_clearly_and_other_requests_run_meanwhile(settings):
    with TestClient(create_app(_with(settings, "data", validate_timeout_seconds=2.0))) as client:
        write_jsonl(settings.data_dir / "big.jsonl", _records(40_000))  # several seconds of tokenizing here
        order: list[str] = []

        def validate() -> httpx.Response:
            r = client.post("/api/data/validate", json={"file_path": "big.jsonl"})
            order.append("validate")
            return r

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(validate)
            for _ in range(3):
                assert client.get("/health").status_code == 200
            order.append("health")
            r = pending.result()
        assert order == ["health", "validate"]  # /health answered while the validation was still running
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "data.validate_timeout_seconds" in error["message"] and error["details"]["timeout_seconds"] == 2.0


def _thread_nices(pid: int) -> set[int]:
    """The nice value of every thread of a process (Linux keeps one per thread)."""
    from pathlib import Path

    return {int(stat.read_text().rsplit(") ", 1)[1].split()[16]) for stat in Path(f"/proc/{pid}/task").glob("*/stat")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_run_nicer_than_the_server_on_cpu(settings):
    import os
    import time

    with TestClient(create_app(_with(settings, "jobs", worker_nice=7))) as client:
        run_id = client.post("/v1/runs", json={"lora": {"r": 4, "alpha": 8}}).json()["id"]
        try:
            deadline = time.monotonic() + 120
            while client.get(f"/v1/runs/{run_id}").json()["status"] == "starting" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get(f"/v1/runs/{run_id}").json()["status"] == "ready"
            pid = client.app.state.run_service.store.get_run(run_id).pid
            # Every thread, torch's included, runs at the server's niceness plus worker_nice.
            assert _thread_nices(pid) == {min(19, os.nice(0) + 7)}
        finally:
            client.delete(f"/v1/runs/{run_id}")


def test_health_job_counts_follow_the_store_while_polled(paused_client):
    import time

    assert paused_client.get("/health").json()["jobs"]["queued"] == 0
    assert _train(paused_client, "outputs/counted").status_code == 202
    deadline = time.monotonic() + 10
    while paused_client.get("/health").json()["jobs"]["queued"] != 1:  # refreshed in the background, ~1 s behind
        assert time.monotonic() < deadline, "/health never showed the queued task"
        time.sleep(0.2)
