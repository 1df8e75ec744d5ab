"""A train task's output: a correct model card, and one final evaluation (not two) at the last step."""

import json

from conftest import SAMPLE, TINY_NAME, wait_for


def test_model_card_and_single_final_eval(client, settings):
    assert client.post("/api/data/upload", files={"file": SAMPLE.open("rb")}).status_code == 201
    split = {"input_file": "uploads/train_sample.json", "output_dir": "s", "split_config": {"seed": 1}}
    assert client.post("/api/data/process", json=split).status_code == 200
    body = {
        "strategy": "lora",
        "dataset_path": "s/train.jsonl",
        "output_dir": "outputs/card",
        "config": {
            "max_steps": 2,
            "save_steps": 2,
            "eval_dataset_path": "s/val.jsonl",
            "learning_rate": 1e-3,
            "lora_config": {"r": 4, "lora_alpha": 8},
        },
    }
    task_id = client.post("/api/train/start", json=body).json()["task_id"]
    task = wait_for(client, task_id, {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    out = settings.model_dir / "outputs" / "card"
    card = (out / "README.md").read_text()
    assert f"base_model: {TINY_NAME}\n" in card
    assert "None" not in card and "huggingface.co" not in card
    assert "strategy `lora`" in card and "`s/train.jsonl`" in card and "`s/val.jsonl`" in card
    assert "| lora r | 4 |" in card and "| max_steps | 2 |" in card
    assert "| eval_loss |" in card and "| final_loss |" in card
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1, evals
    assert task["metrics"]["eval_loss"] == evals[0]["eval_loss"]
