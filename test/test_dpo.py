"""DPO: preference data through validate/process, the dpo strategy on TRL's DPOTrainer, and its served output."""

import json
import shutil

import pytest

from conftest import PROJECT_ROOT, wait_for, write_jsonl

PREFS = PROJECT_ROOT / "test" / "data" / "preference_sample.jsonl"
DPO_CONFIG = {"max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "save_steps": 4, "beta": 0.1}


@pytest.fixture
def prefs(settings) -> str:
    """The sample preference file copied into the data dir; its client path."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PREFS, settings.data_dir / PREFS.name)
    return PREFS.name


def rising(values: list[float]) -> bool:
    """Whether the last third of a series averages above its first third."""
    third = max(1, len(values) // 3)
    return sum(values[-third:]) / third > sum(values[:third]) / third


def test_validate_reports_preference_lines(client, settings):
    good = json.loads(PREFS.read_text().splitlines()[0])
    trl_style = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
    path = write_jsonl(
        settings.data_dir / "prefs.jsonl",
        [
            good,
            trl_style,
            {"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "same"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "{not json",
        ],
    )
    body = client.post("/api/data/validate", json={"file_path": str(path)}).json()
    assert body["kind"] == "preference" and not body["valid"]
    assert body["formats"] == {"openai_dpo": 1, "preference": 1}
    reasons = {e["line"]: e["reason"] for e in body["errors"]}
    assert "non_preferred_output" in reasons[3]
    assert "identical" in reasons[4]
    assert "assistant" in reasons[5]
    assert "chat record in a preference file" in reasons[6]
    assert "bad JSON" in reasons[7]
    assert body["token_stats"]["max"] > 0


def test_process_splits_preferences_in_trl_format(client, settings, prefs):
    r = client.post(
        "/api/data/process",
        json={
            "input_file": prefs,
            "output_dir": "prefs",
            "split_config": {"train_ratio": 0.75, "val_ratio": 0.25, "test_ratio": 0},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["splits"]["train"]["count"] == 12
    rows = [json.loads(x) for x in (settings.data_dir / "prefs" / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    again = client.post("/api/data/validate", json={"file_path": "prefs/train.jsonl"}).json()
    assert again["valid"] and again["formats"] == {"preference": 12}


def test_dpo_strategy_trains_full_weights_and_output_is_served(client, settings, prefs):
    """Full-weight DPO from /api/train/start (the /v1 job test covers LoRA DPO)."""
    config = {**DPO_CONFIG, "learning_rate": 1e-3}
    r = client.post("/api/train/start", json={"strategy": "dpo", "dataset_path": prefs, "config": config})
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed", "cancelled"})
    assert task["status"] == "succeeded", task["error"]
    events = client.get(f"/api/train/logs/{task['id']}").json()["items"]
    steps = [e["data"] for e in events if e["type"] == "metrics"]
    assert len(steps) == 8
    assert all("rewards/margins" in s and "rewards/accuracies" in s for s in steps)
    assert rising([s["rewards/margins"] for s in steps]), [s["rewards/margins"] for s in steps]
    chat = client.post(
        "/v1/chat/completions",
        json={"model": task["id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text
    out = settings.model_dir / "outputs" / task["id"]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "training_args.json").read_text())["strategy"] == "dpo"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"strategy": "dpo", "dataset_path": "sample.json"}, "no valid preference"),
        ({"strategy": "lora", "dataset_path": PREFS.name}, "no valid conversations"),
        ({"strategy": "lora", "dataset_path": "x.jsonl", "config": {"beta": 0.2}}, "dpo strategy only"),
        ({"strategy": "dpo", "dataset_path": PREFS.name, "config": {"packing": True}}, "does not pack"),
        ({"strategy": "dpo", "dataset_path": PREFS.name, "config": {"loss_type": "nope"}}, "loss_type"),
    ],
)
def test_dpo_request_checks(client, settings, prefs, body, text):
    shutil.copy(PROJECT_ROOT / "test" / "data" / "train_sample.json", settings.data_dir / "sample.json")
    r = client.post("/api/train/start", json=body)
    assert r.status_code == 422, r.text
    assert text in r.json()["error"]["message"]
