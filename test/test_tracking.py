"""Experiment tracking: report_to writes TensorBoard event files and MLflow runs, read back with their own readers."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import SAMPLE, make_settings, wait_for
from service.train import tracking

FAST = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 50}


def _upload(client) -> str:
    r = client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    assert r.status_code == 201, r.text
    return "uploads/train_sample.json"


def _train(client, **config) -> dict:
    body = {"strategy": "lora", "dataset_path": _upload(client), "config": {**FAST, **config}}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    return task


def _logged_losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def test_tensorboard_and_mlflow_read_back_the_metrics(client, settings, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset = _upload(client)
    body = {"strategy": "lora", "dataset_path": dataset, "config": {**FAST, "report_to": ["tensorboard", "mlflow"]}}
    tracked = client.post("/api/train/start", json=body).json()["task_id"]
    # the default (config train.report_to) is TensorBoard: seen on a second task, cancelled while it queues
    default = client.post("/api/train/start", json={"strategy": "lora", "dataset_path": dataset, "config": FAST})
    queued = client.get(f"/api/train/status/{default.json()['task_id']}").json()
    assert queued["status"] == "queued" and queued["request"]["resolved"]["report_to"] == ["tensorboard"]
    assert client.post(f"/api/train/cancel/{queued['id']}").json()["status"] == "cancelled"

    task = wait_for(client, tracked, {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    assert task["request"]["resolved"]["report_to"] == ["tensorboard", "mlflow"]
    out = settings.model_dir / task["output_dir"]
    expected = _logged_losses(out)
    assert [step for step, _ in expected] == [1, 2, 3]

    events = EventAccumulator(str(out / tracking.TENSORBOARD_DIR))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert len(events.Scalars("train/learning_rate")) == 3

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader opens the same local file store
    ml = MlflowClient(tracking_uri=(out / tracking.MLFLOW_DIR).as_uri())
    experiment = ml.get_experiment_by_name(settings.train.experiment_name)
    assert experiment is not None
    runs = ml.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == task["id"]
    history = ml.get_metric_history(runs[0].info.run_id, "loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert runs[0].data.params["learning_rate"] == "0.001"


def test_trackers_resolution_and_environment(tmp_path, tiny_model_root):
    assert tracking.trackers(None, "tensorboard") == ["tensorboard"]
    assert tracking.trackers("none", "tensorboard") == []
    assert tracking.trackers(["mlflow", "tensorboard"], "none") == ["mlflow", "tensorboard"]
    assert tracking.trackers(None, ["none"]) == []
    settings = make_settings(tmp_path, tiny_model_root)
    env = tracking.tracking_env(["tensorboard", "mlflow", "wandb"], tmp_path / "out", settings)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "out" / "tensorboard")
    assert env["MLFLOW_TRACKING_URI"] == (tmp_path / "out" / "mlruns").as_uri()
    assert env["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert (env["WANDB_MODE"], env["WANDB_DIR"]) == ("offline", str(tmp_path / "out"))
    sqlite = settings.model_copy(
        update={"train": settings.train.model_copy(update={"mlflow_tracking_uri": "sqlite:///x.db"})}
    )
    env = tracking.tracking_env(["mlflow"], tmp_path, sqlite)
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db" and "MLFLOW_ALLOW_FILE_STORE" not in env


@pytest.mark.parametrize(
    ("report_to", "text"),
    [
        (["none", "mlflow"], "cannot be combined"),
        (["mlflow", "mlflow"], "must not repeat"),
        ("comet", "report_to"),
        (5, "report_to"),
    ],
)
def test_bad_report_to_is_422(client, report_to, text):
    body = {"strategy": "lora", "dataset_path": "x.jsonl", "config": {"report_to": report_to}}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 422, r.text
    assert text in r.json()["error"]["message"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_tracker_package_is_refused_before_queueing(client):
    body = {"strategy": "lora", "dataset_path": _upload(client), "config": {"report_to": ["tensorboard", "wandb"]}}
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 422, r.text
    assert "pip install wandb" in r.json()["error"]["message"]
    assert client.get("/api/train/tasks").json()["total"] == 0
