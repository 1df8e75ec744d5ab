"""Train submit checks: data of which no record would reach training at its max_length is refused up front."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from conftest import wait_for, write_jsonl
from main import create_app
from service import models
from service.train import service as train_service

FAST = {"max_steps": 2, "per_device_train_batch_size": 1, "learning_rate": 1e-3, "save_steps": 2}


def chat(i: int, question: str | None = None) -> dict:
    """A short chat record (or one with the given question)."""
    return {
        "messages": [
            {"role": "user", "content": question or f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }


def measure(settings, record: dict) -> tuple[int, int]:
    """(tokens before the first assistant token, all tokens) of a record, as the worker tokenises it."""
    row = models.tokenize_with_assistant_mask(models.load_tokenizer(settings.base_model_path()), record["messages"])
    return row["assistant_masks"].index(1), len(row["input_ids"])


def start(client, dataset: str = "d.jsonl", strategy: str = "lora", stages=None, **config):
    body = {"strategy": strategy, "dataset_path": dataset, "config": {**FAST, **config}}
    if stages is not None:
        body["stages"] = stages
    return client.post("/api/train/start", json=body)


def accepted(client, r) -> str:
    """Assert a 202 and cancel the task (these tests check the submit only)."""
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    client.post(f"/api/train/cancel/{task_id}")
    return task_id


def refused(client, r, *texts: str) -> dict:
    """Assert a 422 naming `texts`, with no task queued."""
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    for text in ("no record would reach training", *texts):
        assert text in error["message"], error["message"]
    assert client.get("/api/train/tasks").json()["total"] == 0
    return error


def test_max_length_that_cuts_every_answer_away_is_refused(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [chat(i) for i in range(5)])
    first, _ = measure(settings, chat(0))  # SmolLM2's template puts a default system prompt before the question
    assert first > 16
    error = refused(client, start(client, max_length=16), "max_length 16", "config.max_length", "assistant_only_loss")
    assert error["details"] == {"field": "dataset_path", "max_length": 16, "shortest": first, "records": 5}
    refused(client, start(client, max_length=first))  # the first answer token would be cut off
    accepted(client, start(client, max_length=first + 1))  # one answer token is left to learn


def test_training_on_every_token_keeps_short_records(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [chat(i) for i in range(3)])
    accepted(client, start(client, max_length=16, assistant_only_loss=False))


def test_without_truncation_every_record_longer_than_max_length_is_refused(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [chat(i) for i in range(3)])
    _, length = measure(settings, chat(1))
    refused(client, start(client, max_length=length - 1, truncate=False), "truncate is false")
    accepted(client, start(client, max_length=length, truncate=False))


def test_one_record_that_fits_is_enough(client, settings):
    long = "why " * 200
    write_jsonl(settings.data_dir / "d.jsonl", [*(chat(i, long) for i in range(50)), chat(99)])
    first, _ = measure(settings, chat(99))
    write_jsonl(settings.data_dir / "only-long.jsonl", [chat(i, long) for i in range(50)])
    refused(client, start(client, "only-long.jsonl", max_length=first + 1))
    accepted(client, start(client, max_length=first + 1))


def test_stages_and_eval_data_are_checked_at_their_max_length(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [chat(i) for i in range(3)])
    first, _ = measure(settings, chat(0))
    ok = first + 8
    stages = [{"max_steps": 1}, {"max_steps": 1, "max_length": 16}]
    error = refused(client, start(client, stages=stages, max_length=ok), "stages.1.max_length")
    assert error["details"]["max_length"] == 16
    write_jsonl(settings.data_dir / "eval.jsonl", [chat(i, "why " * 200) for i in range(3)])
    error = refused(client, start(client, max_length=ok, eval_dataset_path="eval.jsonl"))
    assert error["details"]["field"] == "eval_dataset_path"
    accepted(client, start(client, max_length=ok, eval_dataset_path="d.jsonl"))


def test_dpo_prompts_that_fill_max_length_are_refused(client, settings):
    def pref(question: str) -> dict:
        return {"prompt": question, "chosen": "Yes, gladly.", "rejected": "No."}

    write_jsonl(settings.data_dir / "p.jsonl", [pref("why " * 100) for _ in range(3)])
    error = refused(client, start(client, "p.jsonl", "dpo", max_length=64), "DPO")
    assert error["details"]["shortest"] >= 64
    write_jsonl(settings.data_dir / "p2.jsonl", [pref("why " * 100), pref("Help me?")])
    accepted(client, start(client, "p2.jsonl", "dpo", max_length=64))


def test_the_check_is_bounded_in_time_and_the_worker_still_says_why(client, settings, monkeypatch):
    monkeypatch.setattr(train_service, "FIT_CHECK_SECONDS", 0.2)
    write_jsonl(settings.data_dir / "d.jsonl", [chat(i) for i in range(20_000)])
    started = time.monotonic()
    r = start(client, max_length=16)
    assert r.status_code == 202, r.text  # not every record was looked at in time: the worker decides
    assert time.monotonic() - started < 60  # the dataset itself is read once for its valid records
    task = wait_for(client, r.json()["task_id"], {"failed", "succeeded", "cancelled"})
    assert task["status"] == "failed"
    assert "no record keeps an assistant token" in task["error"], task["error"]


@pytest.fixture
def short_client(settings):
    """A client whose server trains at train.max_length 16 by default."""
    short = settings.model_copy(update={"train": settings.train.model_copy(update={"max_length": 16})})
    with TestClient(create_app(short)) as c:
        yield c


def test_fine_tuning_jobs_are_checked_the_same_way(short_client):
    lines = "\n".join(json.dumps(chat(i)) for i in range(3)) + "\n"
    r = short_client.post("/v1/files", files={"file": ("t.jsonl", lines.encode())}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    r = short_client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": r.json()["id"]})
    assert r.status_code in (400, 422), r.text
    assert "no record would reach training" in r.text and "train.max_length" in r.text
    assert short_client.get("/api/train/tasks").json()["total"] == 0
