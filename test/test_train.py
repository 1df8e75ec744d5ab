"""Training API: the full pipeline per strategy, request checks, cancel, queueing, crashes, events."""

import json
import os
import signal
import time

import pytest
from peft import PeftModel
from pg import both_backends
from transformers import AutoModelForCausalLM

from conftest import SAMPLE, wait_for, write_jsonl
from service import models
from service.jobs import pid_alive

pytestmark = both_backends  # every test here runs on SQLite and on PostgreSQL (test/pg.py)

FAST = {"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 3}


def _prepare_splits(client) -> dict:
    """Upload the sample, validate it, and split it, as the README's curl pipeline does."""
    up = client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    assert up.status_code == 201, up.text
    assert client.post("/api/data/validate", json={"file_path": "uploads/train_sample.json"}).json()["valid"]
    r = client.post(
        "/api/data/process",
        json={"input_file": "uploads/train_sample.json", "output_dir": "sample", "split_config": {"seed": 3}},
    )
    assert r.status_code == 200, r.text
    return r.json()["splits"]


def _start(client, **body):
    payload = {"strategy": "lora", "dataset_path": "sample/train.jsonl", "config": dict(FAST)}
    payload.update(body)
    return client.post("/api/train/start", json=payload)


@pytest.mark.parametrize("strategy", ["trl", "lora"])
def test_pipeline_trains_and_saves_loadable_output(client, settings, strategy):
    _prepare_splits(client)
    config = {**FAST, "eval_dataset_path": "sample/val.jsonl", "lora_config": {"r": 4, "lora_alpha": 8}}
    r = _start(client, strategy=strategy, output_dir=f"outputs/{strategy}-run", config=config)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["status"] == "queued"
    task = wait_for(client, started["task_id"], {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    assert (task["current_step"], task["total_steps"], task["progress"]) == (6, 6, 100.0)
    assert task["loss"] is not None and task["learning_rate"] is not None
    assert task["tokens_per_second"] > 0
    assert task["metrics"]["global_step"] == 6
    assert "eval_loss" in task["metrics"]
    assert task["started_at"] and task["finished_at"]

    out = settings.model_dir / "outputs" / f"{strategy}-run"
    assert (task["output_dir"], task["output_root"]) == (f"outputs/{strategy}-run", "model")
    for name in ("training_args.json", "trainer_log.jsonl", "tokenizer_config.json", "checkpoint-3", "checkpoint-6"):
        assert (out / name).exists(), name
    log_lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log_lines if "loss" in x] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "training_args.json").read_text())["strategy"] == strategy

    base = settings.base_model_path()
    if strategy == "lora":
        assert models.is_adapter_dir(out)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    else:
        assert (out / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(out)
    assert model is not None

    events = client.get(f"/api/train/logs/{task['id']}").json()["items"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) == 6 and all("loss" in e["data"] for e in metrics)
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]


def test_events_stream_over_sse_and_resume(client, settings):
    _prepare_splits(client)
    task_id = _start(client, config={**FAST, "max_steps": 2}).json()["task_id"]
    seen = []
    with client.stream("GET", f"/api/train/events/{task_id}") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                seen.append(line.split(":", 1)[1].strip())
            if line.startswith("id:"):
                last_id = int(line.split(":", 1)[1])
    assert seen[0] == "status" and seen[-1] == "end"
    assert "metrics" in seen
    with client.stream("GET", f"/api/train/events/{task_id}", headers={"Last-Event-ID": str(last_id - 1)}) as resp:
        ids = [int(x.split(":", 1)[1]) for x in resp.iter_lines() if x.startswith("id:")]
    assert ids == [last_id]


def test_assistant_mask_covers_only_assistant_turns(settings):
    tok = models.load_tokenizer(settings.base_model_path())
    conv = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello friend"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    enc = models.tokenize_with_assistant_mask(tok, conv)
    assert len(enc["input_ids"]) == len(enc["assistant_masks"])
    kept = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m])
    assert kept == "Hello friend<|im_end|>\nGoodbye<|im_end|>\n"


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"strategy": "ppo"}, 422, "Unknown strategy"),
        ({"config": {**FAST, "learning_rate": -1}}, 422, "learning_rate"),
        ({"config": {**FAST, "bogus": 1}}, 422, "bogus"),
        ({"config": {**FAST, "num_train_epochs": 1}}, 422, "not both"),
        ({"config": {**FAST, "lora_config": {"r": 0}}}, 422, "lora_config.r"),
        ({"dataset_path": "/etc/passwd"}, 403, "outside the allowed roots"),
        ({"dataset_path": "missing.jsonl"}, 404, "does not exist"),
        ({"output_dir": "/tmp/elsewhere"}, 403, "outside the allowed roots"),
        ({"config": {**FAST, "model_path": "no-such-model"}}, 404, "was not found"),
    ],
)
def test_bad_train_requests(client, settings, body, status, text):
    write_jsonl(
        settings.data_dir / "sample" / "train.jsonl",
        [
            json.loads(x)
            for x in ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}']
        ],
    )
    r = _start(client, **body)
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]
    assert client.get("/api/train/tasks").json()["total"] == 0


def test_dataset_without_valid_records_and_busy_output(client, settings):
    write_jsonl(settings.data_dir / "junk.jsonl", ["{nope"])
    r = _start(client, dataset_path="junk.jsonl")
    assert r.status_code == 422
    (settings.model_dir / "outputs" / "full").mkdir(parents=True)
    (settings.model_dir / "outputs" / "full" / "x").write_text("keep me")
    _prepare_splits(client)
    r = _start(client, output_dir="outputs/full")
    assert r.status_code == 409
    assert (settings.model_dir / "outputs" / "full" / "x").read_text() == "keep me"


def test_cancel_running_and_queued_tasks(client, settings):
    _prepare_splits(client)
    long = {**FAST, "max_steps": 100000, "save_steps": 100000}
    first = _start(client, config=long).json()["task_id"]
    second = _start(client, config=long).json()["task_id"]
    running = wait_for(client, first, {"running"})
    deadline = time.monotonic() + 120
    while client.get(f"/api/train/status/{first}").json()["current_step"] < 1:
        assert time.monotonic() < deadline, "training never made a step"
        time.sleep(0.3)
    # One slot: the second waits while the first runs.
    assert client.get(f"/api/train/status/{second}").json()["status"] == "queued"
    assert client.get("/health").json()["jobs"] == {"active": 1, "queued": 1, "total": 2, "slots": 1}
    listing = client.get("/api/train/tasks", params={"status": "queued"}).json()
    assert [t["id"] for t in listing["items"]] == [second]

    pid = client.app.state.store.get(first).pid
    assert pid and pid_alive(pid)
    r = client.post(f"/api/train/cancel/{first}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert not pid_alive(pid)
    # The freed slot goes to the queued task; cancel it too (running or still queued).
    r = client.post(f"/api/train/cancel/{second}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = client.post(f"/api/train/cancel/{first}")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]["message"]
    assert running["started_at"]
    assert client.post("/api/train/cancel/doesnotexist").status_code == 404


def test_child_crash_fails_task_and_server_stays_up(client, settings):
    _prepare_splits(client)
    broken = settings.model_dir / "broken-model"
    broken.mkdir()
    base = settings.base_model_path()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((base / name).read_bytes())  # no weights: loading must fail in the child
    task_id = _start(client, strategy="trl", config={**FAST, "model_path": "broken-model"}).json()["task_id"]
    task = wait_for(client, task_id, {"succeeded", "failed"})
    assert task["status"] == "failed"
    assert "Error" in task["error"] and "Traceback" in task["error"]
    assert client.get("/health").json()["status"] == "ok"


def test_killed_worker_is_reported(client, settings):
    _prepare_splits(client)
    task_id = _start(client, config={**FAST, "max_steps": 100000}).json()["task_id"]
    wait_for(client, task_id, {"running"})
    deadline = time.monotonic() + 30
    while not (pid := client.app.state.store.get(task_id).pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    task = wait_for(client, task_id, {"failed"}, timeout=30)
    assert "killed by signal SIGKILL" in task["error"]
    assert client.get("/health").json()["jobs"]["active"] == 0


def test_unknown_task_is_404(client):
    for path in ("/api/train/status/nope", "/api/train/logs/nope", "/api/train/events/nope"):
        r = client.get(path)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"


def test_server_shutdown_stops_workers_and_records_why(settings):
    from fastapi.testclient import TestClient

    from main import create_app
    from service.jobs import SHUTDOWN_ERROR

    with TestClient(create_app(settings)) as client:
        _prepare_splits(client)
        # No checkpoint: a train task with one would be re-queued to resume instead (test_train_config.py).
        task_id = _start(client, config={**FAST, "max_steps": 100000, "save_steps": 100000}).json()["task_id"]
        deadline = time.monotonic() + 120
        while client.get(f"/api/train/status/{task_id}").json()["current_step"] < 1:
            assert time.monotonic() < deadline, "training never made a step"
            time.sleep(0.3)
        pid = client.app.state.store.get(task_id).pid
        store = client.app.state.store
    assert not pid_alive(pid)
    task = store.get(task_id)
    assert (task.status, task.error) == ("failed", SHUTDOWN_ERROR)


def test_adapter_as_model_continues_lora_or_merges_for_full_sft(client, settings):
    _prepare_splits(client)
    first = _start(client, output_dir="outputs/first", config={**FAST, "max_steps": 2}).json()["task_id"]
    assert wait_for(client, first, {"succeeded", "failed"})["status"] == "succeeded"
    adapter = settings.model_dir / "outputs" / "first"
    cont = _start(client, output_dir="outputs/cont", config={**FAST, "max_steps": 2, "model_path": "outputs/first"})
    full = _start(
        client, strategy="trl", output_dir="outputs/full", config={**FAST, "max_steps": 2, "model_path": str(adapter)}
    )
    for r in (cont, full):
        assert r.status_code == 202, r.text
        task = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
        assert task["status"] == "succeeded", task["error"]
    assert models.is_adapter_dir(settings.model_dir / "outputs" / "cont")
    merged = settings.model_dir / "outputs" / "full"
    assert not models.is_adapter_dir(merged) and (merged / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
