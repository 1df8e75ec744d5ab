"""Tasks on a Ray cluster (jobs.backend: ray): train and eval succeed, cancel and ray.kill free the actor, adoption."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from unittest.mock import ANY

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from conftest import SAMPLE, TINY_NAME, make_settings, start_server, stop_server, wait_for, write_jsonl
from main import create_app
from service.jobs import pid_alive
from util.settings import PROJECT_ROOT, Settings, load_settings

REQUIRED = bool(os.environ.get("CI") or os.environ.get("WT_REQUIRE_RAY"))  # CI (.ci/run) fails instead of skipping
if not REQUIRED:
    pytest.importorskip("ray", reason="ray is not installed (it is in requirements.txt)")
import ray  # noqa: E402 - after the skip check

from service.backends.ray_backend import NAMESPACE, actor_name  # noqa: E402 - needs ray

CPUS = 2
FAST = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 2}
LONG = {**FAST, "max_steps": 100000, "save_steps": 100000}
QA = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[None]:
    """A real local Ray head with 2 CPUs, once per module; shut down (only its own processes) after.

    Ray resolves a loopback node address to the host's own and listens on every interface; token authentication
    (on by default for a local head in Ray 2.60) is what keeps others out.
    """
    temp = tempfile.mkdtemp(prefix="wtray")  # short: Ray's socket paths must fit in 107 characters
    try:
        ray.init(
            address="local",  # a fresh head of our own, never another Ray that happens to run on this machine
            num_cpus=CPUS,
            num_gpus=0,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
            object_store_memory=100 * 1024**2,
            _temp_dir=temp,
        )
    except Exception as exc:  # report why; in CI fail rather than skip
        if REQUIRED:
            raise
        pytest.skip(f"a local Ray head could not start in this environment: {exc}")
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_settings(tmp_path, tiny_model_root, ray_head) -> Settings:
    """Per-test settings with jobs.backend: ray (the runner reuses the fixture's Ray)."""
    settings = make_settings(tmp_path, tiny_model_root)
    return settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"backend": "ray"})})


@pytest.fixture
def ray_client(ray_settings) -> Iterator[TestClient]:
    """A TestClient whose scheduler runs tasks as Ray actors."""
    with TestClient(create_app(ray_settings)) as client:
        yield client


def _prepare(client: TestClient) -> None:
    """Upload and split the sample dataset."""
    up = client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    assert up.status_code == 201, up.text
    r = client.post("/api/data/process", json={"input_file": "uploads/train_sample.json", "output_dir": "sample"})
    assert r.status_code == 200, r.text


def _train(client: TestClient, config: dict, output_dir: str = "outputs/ray") -> str:
    """Start a LoRA train task; its id."""
    body = {"strategy": "lora", "dataset_path": "sample/train.jsonl", "output_dir": output_dir, "config": config}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def _actor(task_id: str):
    """The task's live actor (ValueError when there is none)."""
    return ray.get_actor(actor_name(task_id), namespace=NAMESPACE)


def _training(client: TestClient, task_id: str) -> int:
    """Wait until the task's worker made a training step; the worker's pid (asked of its actor)."""
    deadline = time.monotonic() + 150
    while (task := client.get(f"/api/train/status/{task_id}").json())["current_step"] < 1:
        assert task["status"] in ("queued", "running"), task["error"]
        assert time.monotonic() < deadline, "training never made a step"
        time.sleep(0.3)
    return ray.get(_actor(task_id).pid.remote(), timeout=30)


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll until predicate() holds (Ray reports freed resources asynchronously)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _gone(task_id: str) -> bool:
    """Whether the task's actor no longer exists."""
    try:
        _actor(task_id)
    except ValueError:
        return True
    return False


def _all_cpus_free() -> bool:
    """Whether every CPU of the head is free again."""
    return ray.available_resources().get("CPU", 0) == CPUS


def test_train_and_eval_tasks_succeed_as_ray_actors(ray_client, ray_settings):
    _prepare(ray_client)
    task_id = _train(ray_client, {**FAST, "lora_config": {"r": 4}})
    task = wait_for(ray_client, task_id, {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    assert task["metrics"]["global_step"] == 2
    assert (ray_settings.model_dir / "outputs" / "ray" / "adapter_config.json").exists()
    events = ray_client.get(f"/api/train/logs/{task_id}").json()["items"]
    running = [e["data"] for e in events if e["type"] == "status" and (e["data"] or {}).get("status") == "running"]
    assert running == [{"status": "running", "backend": "ray", "actor": actor_name(task_id), "resources": ANY}]
    assert running[0]["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert any(e["type"] == "metrics" for e in events), [e["type"] for e in events]  # the worker reported steps
    assert ray_settings.data_dir.joinpath("logs", f"{task_id}.log").stat().st_size > 0  # the worker logged there
    _wait(lambda: _gone(task_id), "the finished task's actor was not released")

    write_jsonl(ray_settings.data_dir / "eval" / "qa.jsonl", QA)
    r = ray_client.post("/api/eval/evaluate", json={"dataset_path": "eval/qa.jsonl", "metrics": ["loss"]})
    assert r.status_code == 202, r.text
    eval_id = r.json()["task_id"]
    task = wait_for(ray_client, eval_id, {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    assert task["metrics"]["metrics"]["loss"] > 0
    _wait(lambda: _gone(eval_id), "the finished eval's actor was not released")
    _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")


def test_cancel_kills_the_actor_and_frees_its_resources(ray_client):
    _prepare(ray_client)
    task_id = _train(ray_client, LONG)
    pid = _training(ray_client, task_id)
    assert pid_alive(pid)
    assert ray.available_resources().get("CPU", 0) < CPUS  # the actor holds its CPU while it trains
    r = ray_client.post(f"/api/train/cancel/{task_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert _gone(task_id)
    _wait(lambda: not pid_alive(pid), "the worker outlived the cancel")
    _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")
    time.sleep(1)  # the worker's own report of its SIGTERM must not overwrite the cancel
    assert ray_client.get(f"/api/train/status/{task_id}").json()["status"] == "cancelled"
    assert ray_client.get("/health").json()["jobs"]["active"] == 0


def test_a_killed_actor_fails_the_task_with_the_reason(ray_client):
    _prepare(ray_client)
    task_id = _train(ray_client, LONG)
    pid = _training(ray_client, task_id)
    ray.kill(_actor(task_id))
    task = wait_for(ray_client, task_id, {"failed", "succeeded", "cancelled"}, timeout=60)
    assert task["status"] == "failed"
    assert "Ray actor died" in task["error"] and actor_name(task_id) in task["error"], task["error"]
    assert "killed by `ray.kill`" in task["error"]
    _wait(lambda: not pid_alive(pid), "the worker outlived its actor")
    _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")


def test_a_restarted_server_adopts_the_actor_and_can_cancel_it(ray_settings):
    with TestClient(create_app(ray_settings)) as client:
        _prepare(client)
        task_id = _train(client, LONG)
        pid = _training(client, task_id)
        runner = client.app.state.runner
        with runner._lock:  # forget the task, as a server killed outright would: its shutdown must not stop it
            runner._running.pop(task_id)
    assert pid_alive(pid) and not _gone(task_id)
    with TestClient(create_app(ray_settings)) as client:
        assert client.get(f"/api/train/status/{task_id}").json()["status"] == "running"
        assert client.get("/health").json()["jobs"]["active"] == 1
        r = client.post(f"/api/train/cancel/{task_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        _wait(lambda: not pid_alive(pid), "the adopted worker outlived the cancel")
    assert _gone(task_id)
    _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")


def test_backend_setting_is_checked(tmp_path):
    with pytest.raises(ValidationError, match="backend"):
        load_settings(PROJECT_ROOT / "config.yaml", {"jobs": {"backend": "slurm"}})


def test_the_local_backend_never_imports_ray():
    code = (
        "import sys; from main import create_app; from util.settings import load_settings, PROJECT_ROOT; "
        "from service.jobs import JobRunner; s = load_settings(PROJECT_ROOT / 'config.yaml'); "
        "assert s.jobs.backend == 'local' and JobRunner(s, None).backend is None; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_eight_tasks_at_once_never_exceed_the_cluster_and_all_cancel(ray_settings):
    jobs = ray_settings.jobs.model_copy(update={"max_concurrent_jobs": None})  # capacity from the cluster: 2 CPUs
    settings = ray_settings.model_copy(update={"jobs": jobs})
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["jobs"]["slots"] == CPUS
        _prepare(client)
        body = {"strategy": "lora", "dataset_path": "sample/train.jsonl", "config": LONG}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/api/train/start", json=body), range(8)))
        assert [r.status_code for r in answers] == [202] * 8, [r.text for r in answers]
        ids = [r.json()["task_id"] for r in answers]
        deadline, seen = time.monotonic() + 60, 0
        while seen < 2 or time.monotonic() < deadline - 50:  # until both slots filled, and for at least 10 s
            statuses = [client.get(f"/api/train/status/{i}").json()["status"] for i in ids]
            actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
            assert statuses.count("running") <= CPUS and len(actors) <= CPUS, (statuses, actors)
            seen = statuses.count("running")
            assert time.monotonic() < deadline, statuses
            time.sleep(0.3)
        assert sorted(statuses) == ["queued"] * 6 + ["running"] * 2
        with ThreadPoolExecutor(8) as pool:
            cancels = list(pool.map(lambda i: client.post(f"/api/train/cancel/{i}"), ids))
        assert [(r.status_code, r.json()["status"]) for r in cancels] == [(200, "cancelled")] * 8
        assert all(_gone(i) for i in ids)
        _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")
        time.sleep(1)  # nothing queued is started after its cancel
        assert {client.get(f"/api/train/status/{i}").json()["status"] for i in ids} == {"cancelled"}


def test_pause_reaches_the_worker_through_its_actor(ray_client):
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0, http_client=ray_client)
    records = [{"messages": r["conversations"]} for r in json.loads(SAMPLE.read_text())] * 2
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    file_id = oai.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    hyper = {"n_epochs": 1, "batch_size": 1}
    job = oai.fine_tuning.jobs.create(model=TINY_NAME, training_file=file_id, hyperparameters=hyper)
    task_id = job.id.removeprefix("ftjob-")
    pid = _training(ray_client, task_id)
    assert oai.fine_tuning.jobs.pause(job.id).status == "paused"
    _wait(lambda: not pid_alive(pid), "the paused worker did not exit", timeout=60)
    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 1 and checkpoints[0].step_number >= 1  # saved at a step end, then exited
    _wait(lambda: _gone(task_id), "the paused task's actor was not released")
    _wait(_all_cpus_free, f"CPUs not freed: {ray.available_resources()}")
    assert oai.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert oai.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_a_server_starts_its_own_ray_without_its_api_keys(tmp_path, tiny_model_root, monkeypatch):
    """jobs.ray_address: null: `main.py` starts a private Ray, runs a task there, and stops it on shutdown."""
    key = "sk-ray-secret-key"
    monkeypatch.setenv("API_KEYS", key)  # the server reads its key from the environment, as in production
    monkeypatch.setenv("WT_AUTH__SOMETHING", "also-secret")
    jobs = {"poll_interval": 0.2, "backend": "ray", "ray_address": None, "ray_num_cpus": 1}
    url, proc = start_server(tmp_path, tiny_model_root, {"jobs": jobs})
    try:
        write_jsonl(tmp_path / "data" / "eval" / "qa.jsonl", QA)
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(
            f"{url}/api/eval/evaluate", json={"dataset_path": "eval/qa.jsonl", "metrics": ["loss"]}, headers=auth
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + 180
        while (task := httpx.get(f"{url}/api/train/status/{task_id}", headers=auth).json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, task
            time.sleep(0.5)
        assert task["status"] == "succeeded", task["error"]
        ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ray" in " ".join(p.cmdline())]
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs), [p.cmdline() for p in ray_procs]
        for p in ray_procs:  # the raylet, the GCS and the workers they start never saw the keys
            env = p.environ()
            assert "API_KEYS" not in env and "WT_AUTH__SOMETHING" not in env, p.cmdline()
    finally:
        stop_server(proc)
    _wait(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_procs), "Ray outlived it")


def test_a_task_no_node_can_hold_is_refused_or_fails_with_the_reason(ray_settings):
    jobs = ray_settings.jobs.model_copy(update={"ray_num_cpus": 3.0})  # 3 CPUs for its one process: the node has 2
    with TestClient(create_app(ray_settings.model_copy(update={"jobs": jobs}))) as client:
        _prepare(client)
        # A train task states its processes, so the server checks them against the cluster's nodes at once
        body = {"strategy": "lora", "dataset_path": "sample/train.jsonl", "config": FAST}
        r = client.post("/api/train/start", json=body)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "1 CPU processes, but the largest node of the Ray cluster (2 CPUs, 3 per process" in message, message
        assert r.json()["error"]["details"] == {"num_gpus": 1, "cpu_processes": 0}
        # Other tasks are placed when they start: one that no node holds fails with what it needs
        write_jsonl(ray_settings.data_dir / "eval" / "qa.jsonl", QA)
        r = client.post("/api/eval/evaluate", json={"dataset_path": "eval/qa.jsonl", "metrics": ["loss"]})
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        task = wait_for(client, task_id, {"failed", "succeeded", "cancelled"}, timeout=30)
    assert task["status"] == "failed"
    assert "needs 3 CPUs and 0 GPUs on one node" in task["error"] and "has 2 CPUs" in task["error"], task["error"]
    assert _gone(task_id)
