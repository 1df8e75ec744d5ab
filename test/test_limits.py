"""Limits that must hold when requests arrive at once: max_runs, one task per output folder, the task queue."""

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
