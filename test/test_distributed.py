"""Distributed training through the service: a real 2-process DDP run (torchrun, gloo on CPU)."""

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from conftest import SAMPLE, free_port, wait_for
from entity.task import TaskRow, TaskStatus
from entity.train import TrainRequest
from service import jobs
from service.jobs import JobRunner, worker_environment
from service.tasks import TaskStore
from service.train.service import TrainService
from service.worker import SETTINGS_ENV
from util.settings import PROJECT_ROOT

FAST = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 100, "num_gpus": 2}


def _start(client, **config):
    client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    body = {"strategy": "lora", "dataset_path": "uploads/train_sample.json", "config": {**FAST, **config}}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def test_two_process_ddp_trains_once_and_logs_once(client, settings):
    task_id = _start(client)
    task = wait_for(client, task_id, {"succeeded", "failed"}, timeout=300)
    assert task["status"] == "succeeded", task["error"]
    out = settings.model_dir / "outputs" / task_id
    args = json.loads((out / "training_args.json").read_text())
    assert args["world_size"] == 2 and args["sft_config"]["ddp_backend"] == "gloo"
    assert (out / "adapter_model.safetensors").is_file()
    events = client.get(f"/api/train/logs/{task_id}").json()["items"]
    # Only rank 0 reports: one metrics event per step, one of each log line.
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert len([e for e in events if (e["message"] or "").startswith("loading")]) == 1
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]


def test_cancel_kills_every_rank(client):
    task_id = _start(client, max_steps=100000)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        task = client.get(f"/api/train/status/{task_id}").json()
        if task["current_step"] >= 1:
            break
        assert task["status"] in {"queued", "running"}, task["error"]
        time.sleep(0.5)
    pid = client.app.state.store.get(task_id).pid
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    ranks = [p for p in tree if "service.worker" in " ".join(p.cmdline())]
    assert len(ranks) >= 3, [p.cmdline() for p in tree]  # torchrun + 2 ranks (each in a session of its own)
    assert client.post(f"/api/train/cancel/{task_id}").json()["status"] == "cancelled"
    time.sleep(0.5)
    alive = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_a_failing_rank_fails_the_task_with_its_error(client, settings):
    broken = settings.model_dir / "broken-model"
    broken.mkdir()
    base = settings.base_model_path()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).exists():
            (broken / name).write_bytes((base / name).read_bytes())  # no weights: every rank fails to load
    task = wait_for(client, _start(client, model_path="broken-model"), {"succeeded", "failed"}, timeout=300)
    assert task["status"] == "failed"
    assert task["error"].startswith("rank ") and "Traceback" in task["error"]


def test_gpu_tasks_take_one_slot_per_gpu(monkeypatch):
    task = TaskRow(id="t", kind="train", status="queued", request={"resolved": {"num_processes": 2}})
    monkeypatch.setattr(jobs.models, "gpu_count", lambda: 2)
    assert jobs.task_slots(task, slots=4) == 2
    monkeypatch.setattr(jobs.models, "gpu_count", lambda: 0)
    assert jobs.task_slots(task, slots=4) == 1  # CPU processes share the one CPU slot
    assert jobs.task_processes(TaskRow(id="u", kind="export", status="queued", request={})) == 1


@pytest.mark.parametrize("num_gpus", [0, 65])
def test_num_gpus_out_of_range_is_422(client, num_gpus):
    client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    body = {"strategy": "lora", "dataset_path": "uploads/train_sample.json", "config": {"num_gpus": num_gpus}}
    assert client.post("/api/train/start", json=body).status_code == 422


def test_fsdp_without_gpus_is_422(client):
    client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    body = {
        "strategy": "trl",
        "dataset_path": "uploads/train_sample.json",
        "config": {"num_gpus": 2, "distributed": "fsdp"},
    }
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 422 and "FSDP needs CUDA" in r.json()["error"]["message"]


def test_two_nodes_meet_by_c10d_rendezvous_and_run_one_task(settings):
    """Multi-node on CPU: two torchrun "nodes" of one rank each meet on loopback (c10d) and train one task once."""
    (settings.data_dir / "uploads").mkdir(parents=True)
    shutil.copy(SAMPLE, settings.data_dir / "uploads" / "train_sample.json")
    store = TaskStore(settings.database_url)
    # A runner that is never started: no scheduler claims the task; the two "nodes" below run it, as on paper.
    config = {**FAST, "num_gpus": 1}
    req = TrainRequest(strategy="lora", dataset_path="uploads/train_sample.json", config=config)
    task = TrainService(settings, JobRunner(settings, store)).start(req)
    assert store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
    env = {**worker_environment(), SETTINGS_ENV: settings.model_dump_json(exclude={"auth"}), "OMP_NUM_THREADS": "1"}
    port = free_port()
    nodes = []
    for node in range(2):
        log = (settings.data_dir / f"node{node}.log").open("wb")
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", task.id),
            *("--local-addr", "127.0.0.1", "-m", "service.worker", "--task-id", task.id),
        ]
        nodes.append(subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=300) for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill() if proc.poll() is None else None
    logs = "\n".join((settings.data_dir / f"node{n}.log").read_text(errors="replace")[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    done = store.get(task.id)
    assert done.status == TaskStatus.succeeded, done.error
    out = settings.model_dir / "outputs" / task.id
    args = json.loads((out / "training_args.json").read_text())
    assert args["world_size"] == 2 and args["sft_config"]["ddp_backend"] == "gloo"
    steps = [e.data["step"] for e in store.events(task.id, 0, 1000) if e.type == "metrics"]
    assert steps == [1, 2, 3, 4]  # one rank reports, once per step


def test_other_ranks_wait_for_rank_0_to_claim_the_output_folder(tmp_path):
    """Ranks > 0 touch the output folder only after rank 0 marked it; a rank that wrote first made rank 0 refuse it."""
    import threading

    from service.train.runner import claim_output_dir, wait_for_claim

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="did not claim"):
        wait_for_claim(out, "t1", timeout=0.3)
    timer = threading.Timer(0.3, claim_output_dir, (out, "t1"))
    timer.start()
    wait_for_claim(out, "t1", timeout=10)
    timer.join()
    with pytest.raises(RuntimeError, match="did not claim"):
        wait_for_claim(out, "another-task", timeout=0.3)
