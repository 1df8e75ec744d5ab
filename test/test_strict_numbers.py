"""Numbers in request bodies are numbers: "5" and true are refused (422) where an integer or number is meant.

A number field still takes a JSON integer (learning_rate 1), a YAML train request still reads 2e-4 as a number,
and query parameters, which arrive as text, still take "5".
"""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from main import create_app

BAD = ["5", True]
CHAT = [{"role": "user", "content": "Hi"}]
TOKENS = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}


@pytest.fixture
def paused_client(settings) -> Iterator[TestClient]:
    """A client whose scheduler is stopped: a request that gets through validation stays queued."""
    with TestClient(create_app(settings)) as c:
        c.app.state.runner.stop()
        yield c


def nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} from "a.b"."""
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def assert_refused(resp: Any, field: str) -> None:
    """A 422 that names `field` with a type error (int_type or float_type)."""
    assert resp.status_code == 422, f"{field}: {resp.status_code} {resp.text}"
    errors = resp.json()["error"]["details"]
    assert any(field in map(str, e["loc"]) and e["type"] in ("int_type", "float_type") for e in errors), errors


# Representative routes: (method path, a body that passes validation, dotted fields that must be numbers).
CASES = [
    (
        "/api/train/start",
        {"strategy": "lora", "dataset_path": "missing.jsonl", "config": {"max_steps": 1}},
        ["config.max_steps", "config.learning_rate", "config.seed", "config.lora_config.r", "config.num_train_epochs"],
    ),
    ("/api/inference/chat", {"messages": CHAT, "max_tokens": 2}, ["max_tokens", "temperature", "top_p", "seed"]),
    ("/api/inference/chat/stream", {"messages": CHAT, "max_tokens": 2}, ["max_tokens"]),
    (
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": CHAT, "max_tokens": 2},
        ["max_tokens", "n", "temperature", "seed"],
    ),
    (
        "/api/data/process",
        {"input_file": "missing.jsonl", "output_dir": "out"},
        ["split_config.train_ratio", "split_config.val_ratio", "split_config.test_ratio", "split_config.seed"],
    ),
    ("/api/data/validate", {"file_path": "missing.jsonl"}, ["max_length"]),
    ("/api/eval/evaluate", {"dataset_path": "missing.jsonl"}, ["batch_size", "max_samples", "generation.max_tokens"]),
    ("/api/export/onnx", {"model": "missing"}, ["opset_version", "tolerance"]),
    ("/v1/runs", {"base_model": "missing"}, ["seed", "lora.r", "lora.alpha"]),
    ("/v1/runs/none/sample", {"prompts": ["Hi"]}, ["num_samples", "max_tokens", "temperature", "top_p", "seed"]),
    ("/v1/runs/none/optim_step", {}, ["learning_rate", "beta1", "eps", "max_grad_norm"]),
    (
        "/v1/fine_tuning/jobs",
        {"model": "tiny-llama", "training_file": "file-missing"},
        ["seed", "hyperparameters.n_epochs", "hyperparameters.batch_size", "hyperparameters.learning_rate_multiplier"],
    ),
    # The Tinker SDK's request types, read by controller/tinker.py.
    (
        "/api/v1/create_model",
        {"session_id": "s", "model_seq_id": 0, "base_model": "missing", "lora_config": {"rank": 8}},
        ["model_seq_id", "lora_config.rank", "lora_config.seed"],
    ),
    (
        "/api/v1/asample",
        {"base_model": "missing", "prompt": TOKENS, "sampling_params": {"max_tokens": 4}},
        ["num_samples", "sampling_params.max_tokens", "sampling_params.temperature", "sampling_params.seed"],
    ),
    (
        "/api/v1/optim_step",
        {"model_id": "missing", "adam_params": {"learning_rate": 0.0001}},
        ["adam_params.learning_rate", "adam_params.beta1"],
    ),
    ("/api/v1/retrieve_futures", {"target": {"sampling_session_id": "missing"}}, ["prev_cursor", "timeout"]),
]


@pytest.mark.parametrize(("path", "body", "fields"), CASES, ids=[c[0] for c in CASES])
def test_strings_and_booleans_are_refused_where_numbers_are_meant(paused_client, path, body, fields):
    ok = paused_client.post(path, json=body)
    assert ok.status_code != 422 or not any(
        e["type"] in ("int_type", "float_type") for e in ok.json()["error"]["details"] or []
    ), f"the base body of {path} is refused: {ok.text}"
    for field in fields:
        for bad in BAD:
            assert_refused(paused_client.post(path, json=merge(body, nested(field, bad))), field.rsplit(".", 1)[-1])


def test_a_number_field_still_takes_an_integer(paused_client):
    train = {"strategy": "lora", "dataset_path": "missing.jsonl", "config": {"max_steps": 1, "learning_rate": 1}}
    assert paused_client.post("/api/train/start", json=train).status_code == 404  # past validation: no such file
    split = {"train_ratio": 1, "val_ratio": 0, "test_ratio": 0}
    body = {"input_file": "missing.jsonl", "output_dir": "out", "split_config": split}
    assert paused_client.post("/api/data/process", json=body).status_code == 404
    adam = {"model_id": "missing", "adam_params": {"learning_rate": 1, "beta1": 0}}
    assert paused_client.post("/api/v1/optim_step", json=adam).status_code == 404


def test_a_yaml_train_request_reads_exponents_as_numbers_and_refuses_quoted_ones(paused_client):
    doc = "strategy: lora\ndataset_path: missing.jsonl\nconfig:\n  learning_rate: 2e-4\n  max_steps: 1\n"
    yaml = {"Content-Type": "application/yaml"}
    assert paused_client.post("/api/train/start", content=doc, headers=yaml).status_code == 404, "2e-4 is a number"
    quoted = doc.replace("max_steps: 1", 'max_steps: "1"')
    assert_refused(paused_client.post("/api/train/start", content=quoted, headers=yaml), "max_steps")


def test_query_parameters_still_take_numbers_as_text(paused_client):
    assert paused_client.get("/api/train/tasks", params={"limit": "5", "offset": "0"}).status_code == 200
    assert paused_client.get("/api/v1/training_runs", params={"limit": "5"}).status_code == 200


def test_a_batch_item_with_a_string_number_fails_alone(paused_client):
    items = [{"messages": CHAT, "max_tokens": "5"}, {"messages": CHAT, "max_tokens": True}]
    body = paused_client.post("/api/inference/batch", json={"requests": items}).json()
    assert [r["error"]["status_code"] for r in body["results"]] == [422, 422], body


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with its $ref followed."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _number_fields(spec: dict[str, Any], schema: dict[str, Any], prefix: str = "", depth: int = 0) -> Iterator[str]:
    """Dotted paths of the integer and number properties of an object schema (and of the objects it nests)."""
    for name, prop in _resolve(spec, schema).get("properties", {}).items():
        options = [_resolve(spec, o) for o in prop.get("anyOf", [prop])]
        if any(o.get("type") in ("integer", "number") for o in options):
            yield prefix + name
        elif depth < 2:
            for option in options:
                if option.get("type") == "object" or "properties" in option:
                    yield from _number_fields(spec, option, f"{prefix}{name}.", depth + 1)


def test_every_documented_number_in_a_json_body_refuses_text_and_booleans(paused_client):
    spec = paused_client.get("/openapi.json").json()
    checked = []
    for path, ops in spec["paths"].items():
        content = ops.get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        url = path.replace("{", "").replace("}", "")  # any id: validation comes before the lookup
        for field in _number_fields(spec, content["application/json"]["schema"]):
            for bad in BAD:
                resp = paused_client.post(url, json=nested(field, bad))
                leaf = field.rsplit(".", 1)[-1]
                assert resp.status_code == 422, f"POST {path} {field}={bad!r}: {resp.status_code} {resp.text}"
                assert leaf in resp.text, f"POST {path} {field}={bad!r}: the 422 does not name it: {resp.text}"
            checked.append(f"{path} {field}")
    assert len(checked) > 60, checked  # the native, OpenAI and Tinker bodies' numbers


def test_the_cli_sends_set_numbers_as_numbers():
    from sdk.cli import parse_sets

    parsed = parse_sets(["max_steps=5", "learning_rate=2e-4", "warmup_ratio=.1", "epochs=+2", "report_to=none"])
    assert parsed == {"max_steps": 5, "learning_rate": 2e-4, "warmup_ratio": 0.1, "epochs": 2, "report_to": "none"}
    assert type(parsed["max_steps"]) is int and type(parsed["epochs"]) is int
