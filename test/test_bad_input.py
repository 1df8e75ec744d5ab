"""Inputs that used to crash a request (500): hostile dataset records and extreme sampling parameters."""

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from conftest import write_jsonl
from main import create_app

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in Python's json scanner
BIG_INT = '{"messages": [], "n": ' + "9" * 5000 + "}"  # ValueError: more than 4300 digits
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def paused_client(settings) -> Iterator[TestClient]:
    """A client whose scheduler is stopped: started tasks stay queued and cost no CPU."""
    with TestClient(create_app(settings)) as c:
        c.app.state.runner.stop()
        yield c


def _hostile_jsonl(settings) -> str:
    """A JSONL file: good, too deep (line 2), good, oversized integer (line 4)."""
    write_jsonl(settings.data_dir / "hostile.jsonl", [GOOD, DEEP, json.dumps(GOOD) + " ", BIG_INT])
    return "hostile.jsonl"


def test_validate_reports_deep_nesting_and_huge_integers_per_line(paused_client, settings):
    r = paused_client.post("/api/data/validate", json={"file_path": _hostile_jsonl(settings)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["total"], body["valid_count"], body["invalid_count"]) == (4, 2, 2)
    assert body["errors"] == [
        {"line": 2, "reason": "JSON nested too deeply"},
        {"line": 4, "reason": "an integer has more than 4300 digits"},
    ]


def test_json_array_file_names_the_bad_element_and_its_line(paused_client, settings):
    text = "[\n" + ",\n".join([json.dumps(GOOD), BIG_INT, json.dumps(GOOD), DEEP, json.dumps(GOOD)]) + "\n]\n"
    (settings.data_dir / "hostile.json").write_text(text, encoding="utf-8")
    body = paused_client.post("/api/data/validate", json={"file_path": "hostile.json"}).json()
    assert (body["valid_count"], body["invalid_count"]) == (2, 2)
    reasons = {e["line"]: e["reason"] for e in body["errors"]}
    assert reasons[2] == "an integer has more than 4300 digits (line 3)"
    # The scanner cannot tell where a too-deep element ends, so reading stops there, and says so.
    assert reasons[4] == "JSON nested too deeply (line 5); the rest of the file was not read"


def test_process_drops_the_hostile_records(paused_client, settings):
    body = {"input_file": _hostile_jsonl(settings), "output_dir": "split", "split_config": {"shuffle": False}}
    r = paused_client.post("/api/data/process", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["total"], r.json()["invalid_dropped"], r.json()["duplicates_dropped"]) == (4, 2, 1)


def test_train_and_eval_accept_files_with_hostile_records_and_refuse_files_of_only_them(paused_client, settings):
    mixed = _hostile_jsonl(settings)
    write_jsonl(settings.data_dir / "only_bad.jsonl", [DEEP, BIG_INT])
    train = {"strategy": "lora", "config": {"max_steps": 1}}
    r = paused_client.post("/api/train/start", json={**train, "dataset_path": mixed})
    assert r.status_code == 202, r.text
    r = paused_client.post("/api/train/start", json={**train, "dataset_path": "only_bad.jsonl"})
    assert r.status_code == 422 and "no valid conversations" in r.json()["error"]["message"]
    r = paused_client.post("/api/eval/evaluate", json={"dataset_path": mixed, "metrics": ["loss"]})
    assert r.status_code == 202, r.text
    r = paused_client.post("/api/eval/evaluate", json={"dataset_path": "only_bad.jsonl", "metrics": ["loss"]})
    assert r.status_code == 422 and "no usable records" in r.json()["error"]["message"]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_temperature_below_1e_5_is_greedy_on_every_route(client, temperature):
    greedy = {"messages": USER, "max_tokens": 4, "temperature": 0}
    tiny = {**greedy, "temperature": temperature, "seed": 7}
    expected = client.post("/api/inference/chat", json=greedy).json()["content"]
    r = client.post("/api/inference/chat", json=tiny)
    assert r.status_code == 200, r.text
    assert r.json()["content"] == expected
    with client.stream("POST", "/api/inference/chat/stream", json=tiny) as s:
        events = [line for line in s.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: done", events
    batch = client.post("/api/inference/batch", json={"requests": [tiny, greedy]}).json()
    assert [item["error"] for item in batch["results"]] == [None, None]
    assert batch["results"][0]["result"]["content"] == expected
    model = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/chat/completions", json={"model": model, **tiny})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_seed_beyond_64_bits_is_422_on_every_route(client):
    body = {"messages": USER, "max_tokens": 2, "seed": 2**64}
    for route in ("/api/inference/chat", "/api/inference/chat/stream"):
        r = client.post(route, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "validation_error" and "seed" in r.json()["error"]["message"]
    item = client.post("/api/inference/batch", json={"requests": [body]}).json()["results"][0]
    assert item["result"] is None and item["error"]["status_code"] == 422 and "seed" in item["error"]["message"]
    model = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/chat/completions", json={"model": model, **body})
    assert r.status_code == 422 and "seed" in r.json()["error"]["message"]
    r = client.post("/v1/runs", json={"seed": 2**63})
    assert r.status_code == 422 and "seed" in r.json()["error"]["message"]
    r = client.post("/api/train/start", json={"dataset_path": "x.jsonl", "config": {"seed": 2**32}})
    assert r.status_code == 422 and "seed" in r.json()["error"]["message"]


def test_integers_beyond_sqlite_range_are_422_not_500(paused_client):
    huge = str(2**63)
    assert paused_client.get("/api/train/tasks", params={"offset": huge}).status_code == 422
    r = paused_client.get("/api/train/logs/nope", params={"after": huge})
    assert r.status_code == 422 and "after" in r.json()["error"]["message"]
    assert paused_client.get("/api/train/events/nope", params={"after": huge}).status_code == 422
