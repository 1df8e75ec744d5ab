"""Config-file training (YAML bodies), data statistics, multi-stage runs, and resuming from checkpoints."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from safetensors.torch import load_file

from conftest import PROJECT_ROOT, start_server, stop_server, wait_for, write_jsonl
from entity.train import TrainRequest
from service import models
from service.jobs import pid_alive
from service.train.dataset import tokenized_rows

YAML = {"Content-Type": "application/yaml"}


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


SHORT = [_chat(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)]
LONG = [_chat("Tell me a long story.", " ".join(f"word{j}" for j in range(150 + 10 * i))) for i in range(3)]


def _data(settings) -> None:
    """Two files: short chats, and long ones plus a broken line and a record that is not a chat."""
    write_jsonl(settings.data_dir / "a.jsonl", SHORT)
    write_jsonl(settings.data_dir / "b.jsonl", [*LONG, "{not json", {"text": "no chat here"}, SHORT[0]])


def test_yaml_config_merges_files_and_skips_over_long_records_with_stats(client, settings):
    _data(settings)
    doc = """
strategy: lora
dataset_path: [a.jsonl, b.jsonl]
output_dir: outputs/yaml-run
config:
  max_steps: 2
  per_device_train_batch_size: 2
  max_length: 96
  truncate: false
  learning_rate: 0.001
  lora_config: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}
"""
    r = client.post("/api/train/start", content=doc, headers={"Content-Type": "application/yaml; charset=utf-8"})
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    assert task["request"]["train"]["dataset_path"] == ["a.jsonl", "b.jsonl"]
    stats = task["metrics"]["data_stats"]
    # 10 short + 3 long + bad JSON + not a chat + a repeat of a short one (kept: merging does not deduplicate).
    assert (stats["records"], stats["processed"], stats["skipped"], stats["failed"], stats["truncated"]) == (
        16,
        11,
        3,
        2,
        0,
    )
    before, after = stats["length_before_truncation"], stats["length_after_truncation"]
    assert before["max"] > 96 >= after["max"]
    assert before["min"] == after["min"] and after["mean"] < before["mean"]
    assert set(before) == {"min", "mean", "median", "p95", "max"}
    out = settings.model_dir / "outputs" / "yaml-run"
    written = json.loads((out / "training_args.json").read_text())["data_stats"]
    assert stats["files"] == ["a.jsonl", "b.jsonl"]  # the API shows them relative to the data dir
    assert {**written, "files": stats["files"]} == stats
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    data_events = [e for e in client.get(f"/api/train/logs/{task['id']}").json()["items"] if e["type"] == "data"]
    assert data_events and data_events[0]["data"]["skipped"] == 3


def test_truncation_statistics(settings):
    _data(settings)
    tok = models.load_tokenizer(settings.base_model_path())
    paths = [settings.data_dir / "a.jsonl", settings.data_dir / "b.jsonl"]
    rows, stats = tokenized_rows(paths, tok, 96, truncate=True)
    assert (stats.processed, stats.truncated, stats.skipped, stats.failed) == (14, 3, 0, 2)
    assert max(len(r["input_ids"]) for r in rows) == 96
    assert all(len(r["input_ids"]) == len(r["assistant_masks"]) for r in rows)
    summary = stats.as_dict()
    assert summary["length_after_truncation"]["max"] == 96 < summary["length_before_truncation"]["max"]
    assert summary["tokens"] == sum(len(r["input_ids"]) for r in rows)


@pytest.mark.parametrize(
    ("body", "headers", "status", "text"),
    [
        ("strategy: lora\ndataset_path: a.jsonl\nconfig: {lerning_rate: 0.1}\n", YAML, 422, "config.lerning_rate"),
        ("strategy: lora\ndataset_path: a.jsonl\nconfig: {max_length: 4}\n", YAML, 422, "config.max_length"),
        ("strategy: lora\ndataset_path: a.jsonl\nconfig: {truncate: maybe}\n", YAML, 422, "config.truncate"),
        ("strategy: lora\ndataset_path: []\n", YAML, 422, "dataset_path"),
        ("strategy: lora\ndataset_path: a.jsonl\nstages: [{max_lenght: 64}]\n", YAML, 422, "stages.0.max_lenght"),
        ("strategy: lora\ndataset_path: a.jsonl\nstages: []\n", YAML, 422, "stages"),
        ("strategy: lora\ndataset_path: [a.jsonl, /etc/passwd]\n", YAML, 403, "outside the allowed roots"),
        ("strategy: lora\ndataset_path: [a.jsonl, missing.jsonl]\n", YAML, 404, "does not exist"),
        ("strategy: lora\ndataset_path: a.jsonl\nresume_from_checkpoint: true\n", YAML, 404, "no checkpoint"),
        ("strategy: lora\ndataset_path: a.jsonl\nresume_from_checkpoint: /etc\n", YAML, 403, "outside the allowed"),
        ("strategy: [unclosed\n", YAML, 422, "not valid YAML"),
        ("- just\n- a list\n", YAML, 422, "mapping of fields"),
        ("{not json", {"Content-Type": "application/json"}, 422, "not valid JSON"),
        ("strategy=lora", {"Content-Type": "text/plain"}, 415, "application/yaml"),
    ],
)
def test_bad_config_files_name_the_key(client, settings, body, headers, status, text):
    _data(settings)
    r = client.post("/api/train/start", content=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"], error
    assert set(error) == {"type", "message", "details"}


def test_example_config_is_a_valid_request():
    doc = yaml.safe_load((PROJECT_ROOT / "examples" / "train.yaml").read_text())
    req = TrainRequest.model_validate(doc)
    assert req.config.truncate and req.config.lora_config.r == 8


def _prepare(settings, name: str = "a.jsonl") -> None:
    write_jsonl(settings.data_dir / name, SHORT + LONG)


def test_multi_stage_one_task_with_per_stage_metrics(client, settings):
    _prepare(settings)
    body = {
        "strategy": "lora",
        "dataset_path": "a.jsonl",
        "output_dir": "outputs/staged",
        "config": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "lora_config": {"r": 4}},
        "stages": [
            {"name": "short", "max_length": 64, "max_steps": 2},
            {"name": "long", "max_length": 160, "max_steps": 3, "learning_rate": 5e-4, "carry_optimizer": True},
        ],
    }
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    assert (task["current_step"], task["total_steps"], task["progress"]) == (5, 5, 100.0)
    stages = task["metrics"]["stages"]
    assert [(s["name"], s["max_length"], s["global_step"], s["learning_rate"]) for s in stages] == [
        ("short", 64, 2, 1e-3),
        ("long", 160, 3, 5e-4),
    ]
    assert stages[0]["data_stats"]["truncated"] == 3 + 10 * 0  # the long chats are cut at 64
    assert stages[0]["data_stats"]["length_after_truncation"]["max"] == 64
    assert stages[1]["data_stats"]["length_after_truncation"]["max"] == 160
    assert task["metrics"]["global_step"] == 5
    out = settings.model_dir / "outputs" / "staged"
    first = load_file(out / "stage-1" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert final.keys() == first.keys() and any(not (final[k] == first[k]).all() for k in final)
    assert (out / "stage-1" / "optimizer_state.pt").is_file()  # the long stage carried it on
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["task_step"]) for x in log if "loss" in x] == [
        ("short", 1),
        ("short", 2),
        ("long", 3),
        ("long", 4),
        ("long", 5),
    ]
    lrs = [x["learning_rate"] for x in log if "loss" in x and x["stage"] == "long"]
    assert lrs[0] <= 5e-4 + 1e-12, "the carried optimizer keeps the stage's own learning rate"


def test_cancelled_multi_stage_task_resumes_in_its_stage(client, settings):
    _prepare(settings)
    stages = [
        {"name": "short", "max_length": 64, "max_steps": 2},
        {"name": "long", "max_length": 160, "max_steps": 400},
    ]
    body = {
        "strategy": "lora",
        "dataset_path": "a.jsonl",
        "output_dir": "outputs/staged-cancel",
        "config": {"per_device_train_batch_size": 2, "save_steps": 2, "lora_config": {"r": 4}},
        "stages": stages,
    }
    task_id = client.post("/api/train/start", json=body).json()["task_id"]
    ckpt = settings.model_dir / "outputs" / "staged-cancel" / "stage-2" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 180
    while not ckpt.is_file():
        assert time.monotonic() < deadline, client.get(f"/api/train/status/{task_id}").json()
        time.sleep(0.2)
    assert client.post(f"/api/train/cancel/{task_id}").json()["status"] == "cancelled"
    body["stages"][1]["max_steps"] = 4
    body["resume_from_checkpoint"] = True
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    done = task["metrics"]["stages"]
    assert [s["global_step"] for s in done] == [2, 4]
    assert done[1]["resumed_from"].endswith("stage-2/checkpoint-2") or done[1]["resumed_from"].endswith(
        f"stage-2/checkpoint-{done[1]['global_step']}"
    )
    assert done[0]["resumed_from"] is None and task["current_step"] == 6


def _tiny_store(tmp_path: Path, tiny_model_root: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "base").symlink_to(tiny_model_root / "base", target_is_directory=True)
    return root


def _status(url: str, task_id: str) -> dict:
    return httpx.get(f"{url}/api/train/status/{task_id}", timeout=10).json()


def _wait(url: str, task_id: str, until: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (task := _status(url, task_id))["status"] not in until:
        assert time.monotonic() < deadline, task
        time.sleep(0.3)
    return task


def test_killed_server_and_worker_resume_to_the_same_weights(tmp_path, tiny_model_root):
    """Kill the server and its worker mid-run; the restarted server resumes the task from its checkpoint.

    The resumed run must end with the weights of an uninterrupted run with the same seed. On CPU in float32
    the resumed trainer restores the exact weights, optimizer moments, scheduler step, RNG state and data
    position, then runs the same kernels on the same batches, so the runs agree bit for bit (measured: a
    max difference of 0.0). The 1e-6 allowance only covers a multi-threaded BLAS summing in another
    order; it is ~1000x below the ~1e-3 a single Adam step at lr 1e-3 moves a weight, so a resume that
    lost or repeated even one step, or restored a different data position, would fail.
    """
    model_root = _tiny_store(tmp_path, tiny_model_root)
    work = tmp_path / "srv"
    work.mkdir()
    write_jsonl(work / "data" / "chats.jsonl", SHORT + LONG)
    config = {
        "max_steps": 12,
        "save_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "seed": 7,
        "max_length": 128,
        "lora_config": {"r": 4},
    }
    body = {"strategy": "lora", "dataset_path": "chats.jsonl", "config": config}
    url, proc = start_server(work, model_root)
    try:
        r = httpx.post(f"{url}/api/train/start", json={**body, "output_dir": "outputs/resumed"}, timeout=30)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        out = model_root / "outputs" / "resumed"
        deadline = time.monotonic() + 180
        while not (out / "checkpoint-4" / "trainer_state.json").is_file():
            assert time.monotonic() < deadline, _status(url, task_id)
            time.sleep(0.1)
        pid = _pid(work, task_id)
        proc.send_signal(signal.SIGKILL)  # the server dies first, then its worker: nobody records anything
        proc.wait(timeout=10)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            stop_server(proc)
    assert not (out / "checkpoint-12").exists(), "the run finished before it was killed; raise max_steps"

    url, proc = start_server(work, model_root)
    try:
        task = _wait(url, task_id, {"succeeded", "failed", "cancelled"})
        assert task["status"] == "succeeded", task["error"]
        assert task["metrics"]["resume_count"] == 1 and task["request"]["resolved"]["resume_count"] == 1
        assert task["current_step"] == 12
        events = httpx.get(f"{url}/api/train/logs/{task_id}", timeout=10).json()["items"]
        requeued = [e for e in events if e["type"] == "status" and e["data"]["status"] == "queued"]
        assert len(requeued) == 2 and "re-queued to resume from checkpoint-" in requeued[1]["message"]
        assert any("resuming from" in (e["message"] or "") for e in events)

        r = httpx.post(f"{url}/api/train/start", json={**body, "output_dir": "outputs/straight"}, timeout=30)
        straight = _wait(url, r.json()["task_id"], {"succeeded", "failed"})
        assert straight["status"] == "succeeded", straight["error"]
    finally:
        stop_server(proc)
    resumed = load_file(out / "adapter_model.safetensors")
    reference = load_file(model_root / "outputs" / "straight" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    diff = max(float((resumed[k] - reference[k]).abs().max()) for k in resumed)
    print(f"max |resumed - uninterrupted| = {diff:.3e}")
    assert diff <= 1e-6, diff
    shutil.rmtree(model_root / "outputs", ignore_errors=True)


def _pid(work: Path, task_id: str) -> int:
    """The worker pid recorded in the server's task DB."""
    from service.tasks import TaskStore

    return int(TaskStore(work / "t.db").get(task_id).pid)


def test_interrupted_task_without_checkpoint_fails_and_resumes_are_capped(settings):
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from entity.task import TaskKind, TaskStatus
    from main import create_app
    from service.jobs import RESTART_ERROR
    from service.tasks import TaskStore

    store = TaskStore(settings.database_url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = settings.model_dir / "outputs" / "capped"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    bare = store.create(TaskKind.train, {"resolved": {}}, str(settings.model_dir / "outputs" / "none"))
    capped = store.create(TaskKind.train, {"resolved": {"resume_count": 3}}, str(out))
    for task in (bare, capped):
        store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
        store.set_pid(task.id, dead.pid)
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/api/train/status/{bare.id}").json()["error"] == RESTART_ERROR
        capped_now = client.get(f"/api/train/status/{capped.id}").json()
        assert capped_now["status"] == "failed"
        assert "gave up after 3 resumes" in capped_now["error"]


def test_cli_starts_from_a_config_file_and_shows_data_stats(tmp_path, tiny_model_root):
    import subprocess
    import sys

    from conftest import SAMPLE
    from sdk import TuningClient

    work = tmp_path / "cli"
    work.mkdir()
    url, proc = start_server(work, _tiny_store(tmp_path, tiny_model_root))
    try:
        with TuningClient(base_url=url) as c:
            c.data.upload(SAMPLE)
        doc = yaml.safe_load((PROJECT_ROOT / "examples" / "train.yaml").read_text())
        doc["config"].update(max_steps=2, max_length=64, truncate=False)
        config = tmp_path / "train.yaml"
        config.write_text(yaml.safe_dump(doc))

        def cli(*args: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "sdk.cli", "--base-url", url, *args]
            return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)

        started = cli("--json", "train", "start", "--config", str(config), "--wait")
        assert started.returncode == 0, started.stderr + started.stdout
        job = json.loads(started.stdout)
        assert job["status"] == "succeeded" and job["current_step"] == 2
        stats = job["metrics"]["data_stats"]
        assert stats["skipped"] > 0 and stats["processed"] + stats["skipped"] + stats["failed"] == stats["records"]
        shown = cli("train", "status", job["id"])
        assert shown.returncode == 0 and "training data" in shown.stdout and "before truncation" in shown.stdout
        with TuningClient(base_url=url) as c:
            assert c.tunings.get(job["id"]).data_stats == stats
            assert c.tunings.get(job["id"]).resume_count == 0
        assert cli("train", "start").returncode != 0  # neither a dataset nor --config
        bad = tmp_path / "bad.yaml"
        bad.write_text("strategy: lora\ndataset_path: uploads/train_sample.json\nconfig: {epochs: 1}\n")
        refused = cli("train", "start", "--config", str(bad))
        assert refused.returncode != 0 and "config.epochs" in refused.stderr
    finally:
        stop_server(proc)


def test_server_shutdown_requeues_a_checkpointed_task_which_the_next_server_finishes(settings):
    from fastapi.testclient import TestClient

    from main import create_app

    _prepare(settings)
    body = {
        "strategy": "lora",
        "dataset_path": "a.jsonl",
        "output_dir": "outputs/shutdown",
        "config": {"max_steps": 400, "save_steps": 2, "per_device_train_batch_size": 2, "lora_config": {"r": 4}},
    }
    ckpt = settings.model_dir / "outputs" / "shutdown" / "checkpoint-2" / "trainer_state.json"
    with TestClient(create_app(settings)) as client:
        task_id = client.post("/api/train/start", json=body).json()["task_id"]
        deadline = time.monotonic() + 180
        while not ckpt.is_file():
            assert time.monotonic() < deadline, client.get(f"/api/train/status/{task_id}").json()
            time.sleep(0.2)
        store = client.app.state.store
        pid = store.get(task_id).pid
    assert not pid_alive(pid)
    task = store.get(task_id)
    assert task.status == "queued" and task.request["resolved"]["resume_count"] == 1
    # The next server picks it up; a smaller max_steps (written into the stored request) lets it end soon.
    with store.session() as s:
        from entity.task import TaskRow

        row = s.get(TaskRow, task_id)
        row.request = {**row.request, "train": {**row.request["train"], "config": {**body["config"], "max_steps": 4}}}
    with TestClient(create_app(settings)) as client:
        done = wait_for(client, task_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["resume_count"] == 1 and done["current_step"] == 4


def test_resume_point_picks_the_stage_and_checkpoint(tmp_path):
    from service.train.runner import STAGE_DONE, plan_stages, resume_point

    req = TrainRequest.model_validate({"strategy": "lora", "dataset_path": "a.jsonl", "stages": [{"max_steps": 2}] * 3})
    resolved = {"output_dir": str(tmp_path), "dataset_path": "a.jsonl", "model_path": "m"}
    stages = plan_stages(req, resolved)

    def checkpoint(stage: int, step: int) -> Path:
        path = tmp_path / f"stage-{stage}" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        return path

    assert resume_point(stages, resolved) == (0, None)  # a fresh task
    auto = {**resolved, "resume_count": 1}
    assert resume_point(stages, auto) == (0, None)  # interrupted before any checkpoint
    first = checkpoint(1, 2)
    assert resume_point(stages, auto) == (0, str(first))
    (tmp_path / "stage-1" / STAGE_DONE).write_text("{}")
    assert resume_point(stages, auto) == (1, None)  # stage 1 done: stage 2 starts from its weights
    assert resume_point(stages, {**resolved, "resume_from_checkpoint": str(first)}) == (1, None)
    (tmp_path / "stage-2" / "checkpoint-1").mkdir(parents=True)  # half-written: no trainer_state.json
    assert resume_point(stages, auto) == (1, None)
    second = checkpoint(2, 2)
    assert resume_point(stages, auto) == (1, str(second))
