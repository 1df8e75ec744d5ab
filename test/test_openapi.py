"""The OpenAPI contract: summaries, tags, error schemas, and every documented example posted in pipeline order."""

import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import DEFAULT_NAME, SAMPLE, make_settings, wait_for
from main import create_app
from util.settings import Settings, load_settings

# The order a new user follows; operations not named here (added later) are posted after these.
PIPELINE = [
    "POST /api/data/validate",
    "POST /api/data/process",
    "POST /api/train/start",
    "POST /api/inference/chat",
    "POST /api/inference/chat/stream",
    "POST /api/inference/batch",
    "POST /v1/chat/completions",
    "POST /api/eval/evaluate",
    "POST /api/export/onnx",
    "POST /api/export/merged",
    "POST /api/export/archive",
    "POST /v1/runs",
    "POST /v1/runs/{run_id}/forward_backward",
    "POST /v1/runs/{run_id}/optim_step",
    "POST /v1/runs/{run_id}/sample",
    "POST /v1/runs/{run_id}/save_state",
    "POST /v1/runs/{run_id}/load_state",
]
MUST_SUCCEED = {"POST /api/data/validate", "POST /api/data/process", "POST /api/train/start"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The generated OpenAPI document of an app on the default config."""
    return create_app(load_settings(None)).openapi()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """('METHOD /path', operation) for every operation."""
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield f"{method.upper()} {path}", op


def auto_summary(op: dict[str, Any]) -> str:
    """The summary FastAPI would make up from the function name (e.g. 'Start', 'Onnx')."""
    name = op["operationId"].split("_api_")[0].split("_v1_")[0].split("_health")[0]
    return name.replace("_", " ").title()


def test_every_operation_has_a_real_and_distinct_summary(spec):
    summaries = {}
    for key, op in operations(spec):
        summary = op.get("summary") or ""
        assert summary and summary != auto_summary(op), f"{key} has no real summary ({summary!r})"
        summaries.setdefault(summary, []).append(key)
    assert not {s: k for s, k in summaries.items() if len(k) > 1}, "summaries must tell operations apart"


def test_every_tag_is_described(spec):
    described = {t["name"]: t.get("description") for t in spec.get("tags", [])}
    used = {tag for _, op in operations(spec) for tag in op.get("tags", [])}
    assert used, "operations carry tags"
    missing = sorted(t for t in used if not described.get(t))
    assert not missing, f"tags without a description: {missing}"


def test_errors_use_the_house_shape_not_detail(spec):
    assert "HTTPValidationError" not in str(spec), "FastAPI's {'detail': ...} 422 schema is still documented"
    error_schema = spec["components"]["schemas"]["ErrorResponse"]
    assert error_schema["required"] == ["error"]
    for key, op in operations(spec):
        for code, resp in op["responses"].items():
            if code.startswith(("4", "5")):
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), f"{key} {code} documents {ref}"
        if key == "GET /api/v1/files/{token}":  # Tinker's signed download links: the signed token is the credential
            continue
        if key.startswith(("POST /api/", "GET /api/", "POST /v1/", "GET /v1/", "DELETE /v1/")):
            assert "401" in op["responses"], f"{key} does not document 401"


def test_every_operation_documents_the_codes_of_its_kind(spec):
    for key, op in operations(spec):
        codes = set(op["responses"])
        assert {"413", "422", "500", "503"} <= codes, f"{key}: {sorted(codes)}"
        if "requestBody" in op:
            assert {"400", "415"} <= codes, f"{key}: {sorted(codes)}"
        if "{" in key:
            assert "404" in codes, f"{key}: {sorted(codes)}"
        if key.split()[0] in ("POST", "PUT", "PATCH", "DELETE"):
            assert "507" in codes, f"{key}: {sorted(codes)}"


def test_self_read_bodies_are_documented(spec):
    paths = spec["paths"]
    train = paths["/api/train/start"]["post"]["requestBody"]["content"]
    assert train["application/json"]["schema"] == train["application/yaml"]["schema"]
    assert "#/$defs/" not in str(spec), "a $ref that no OpenAPI tool resolves"
    sample = paths["/api/v1/asample"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert sample == {"$ref": "#/components/schemas/TinkerSampleRequest"}
    assert "TinkerSamplingParams" in spec["components"]["schemas"]
    assert "application/x-protobuf" in paths["/api/v1/forward_backward"]["post"]["requestBody"]["content"]


def test_specific_errors_are_documented(spec):
    paths = spec["paths"]
    assert {"403", "404", "409", "422"} <= set(paths["/api/data/process"]["post"]["responses"])
    assert {"404", "409"} <= set(paths["/api/train/cancel/{task_id}"]["post"]["responses"])
    assert "429" in paths["/v1/runs"]["post"]["responses"]
    assert "404" in paths["/api/train/status/{task_id}"]["get"]["responses"]


def test_chat_completions_has_a_response_schema(spec):
    ok = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    ref = ok["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(schema["properties"])


def test_every_json_body_has_usable_examples(spec):
    for key, op in operations(spec):
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" not in content or "tinker" in op.get("tags", []):
            continue  # the Tinker routes' bodies are the tinker SDK's own request types, which the SDK sends
        found = content["application/json"].get("examples")
        assert found, f"{key} has no request example"
        for example in found.values():
            text = str(example["value"])
            assert "'string'" not in text, f"{key}: a placeholder 'string' in {text}"
            config = example["value"].get("config", {})
            assert not ("max_steps" in config and "num_train_epochs" in config), key
            assert config.get("use_liger_kernel") is not True, f"{key}: liger needs CUDA"


# -- the examples, posted ------------------------------------------------------------------------------------


@pytest.fixture
def docs_settings(tmp_path, default_named_model_root) -> Settings:
    """A fresh data dir, with the tiny model under the default model's name (as a fresh install has it)."""
    settings = make_settings(tmp_path, default_named_model_root)
    return settings.model_copy(update={"models": settings.models.model_copy(update={"base_model": DEFAULT_NAME})})


def _stream_ok(client: TestClient, path: str, body: dict[str, Any]) -> int:
    """POST a streaming route and read it to the end; the status code."""
    with client.stream("POST", path, json=body) as resp:
        text = "".join(resp.iter_text())
        assert "event: error" not in text, text[-500:]
        return resp.status_code


def test_documented_examples_work_in_pipeline_order(docs_settings):
    with TestClient(create_app(docs_settings)) as client:
        spec = client.get("/openapi.json").json()
        ops = dict(operations(spec))
        order = [k for k in PIPELINE if k in ops] + sorted(k for k in ops if k not in PIPELINE)
        assert client.post("/api/data/upload", files={"file": SAMPLE.open("rb")}).status_code == 201
        ids: dict[str, str] = {}
        seen: dict[str, list[int]] = {}
        for key in order:
            content = ops[key].get("requestBody", {}).get("content", {}).get("application/json")
            if not content or not key.startswith("POST "):
                continue
            path = key.split(" ", 1)[1]
            path = re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), "0" * 32), path)
            for name, example in content.get("examples", {}).items():  # the Tinker bodies have none
                body = example["value"]
                if body.get("stream") or path.endswith("/stream"):
                    code = _stream_ok(client, path, body)
                else:
                    resp = client.post(path, json=body)
                    code = resp.status_code
                    assert code < 500, f"{key} example {name}: {code} {resp.text}"
                    answer = resp.json()
                    if key == "POST /api/train/start" and name == "lora":
                        ids["task_id"] = answer["task_id"]
                        task = wait_for(client, answer["task_id"], {"succeeded", "failed", "cancelled"})
                        assert task["status"] == "succeeded", task["error"]
                    elif "task_id" in answer and key in ("POST /api/train/start", "POST /api/eval/evaluate"):
                        client.post(f"/api/train/cancel/{answer['task_id']}")  # accepted: no need to run it
                    if key == "POST /v1/runs":
                        ids["run_id"] = answer["id"]
                    if "job_id" in answer:  # a run's jobs run in order: wait, so the next primitive finds it done
                        job = client.get(f"/v1/jobs/{answer['job_id']}", params={"wait": True, "timeout": 120}).json()
                        assert job["status"] == "completed", job
                if key in MUST_SUCCEED:
                    assert 200 <= code < 300, f"{key} example {name}: {code}"
                seen.setdefault(key, []).append(code)
        assert set(MUST_SUCCEED) <= set(seen)
        for export in ("onnx", "merged", "archive"):
            assert all(c < 300 for c in seen[f"POST /api/export/{export}"]), seen
        if "run_id" in ids:
            client.delete(f"/v1/runs/{ids['run_id']}")


def test_timestamps_carry_utc(settings):
    with TestClient(create_app(settings)) as client:
        client.post("/api/data/upload", files={"file": SAMPLE.open("rb")})
        client.post("/api/data/process", json={"input_file": "uploads/train_sample.json", "output_dir": "s"})
        body = {"strategy": "lora", "dataset_path": "s/train.jsonl", "config": {"max_steps": 1}}
        task_id = client.post("/api/train/start", json=body).json()["task_id"]
        client.post(f"/api/train/cancel/{task_id}")
        time.sleep(0.2)
        task = client.get(f"/api/train/status/{task_id}").json()
        events = client.get(f"/api/train/logs/{task_id}").json()["items"]
        for stamp in [task["created_at"], task["finished_at"], *(e["created_at"] for e in events)]:
            parsed = datetime.fromisoformat(stamp)
            assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0, stamp


def test_an_empty_id_says_what_is_wrong(client):
    missing = client.get("/api/train/status/")
    assert missing.status_code == 404
    message = missing.json()["error"]["message"]
    assert "$TASK_ID" in message and "/api/train/status/" in message
    empty = client.post("/api/inference/chat", json={"model": "", "messages": [{"role": "user", "content": "Hi"}]})
    assert empty.status_code == 422, empty.text
    assert "empty" in empty.json()["error"]["message"]


def test_status_routes_only_show_their_own_kind(client):
    from conftest import add_task
    from entity.task import TaskStatus

    train_id = add_task(client, TaskStatus.succeeded, None, kind="train")
    eval_id = add_task(client, TaskStatus.succeeded, None, kind="eval")
    assert client.get(f"/api/eval/status/{train_id}").status_code == 404
    assert client.get(f"/api/export/status/{eval_id}").status_code == 404
    assert client.get(f"/api/eval/status/{eval_id}").status_code == 200
    assert client.get(f"/api/train/status/{eval_id}").status_code == 200


def test_a_403_does_not_reveal_the_roots(client, settings):
    r = client.post("/api/data/validate", json={"file_path": "/etc/passwd"})
    assert r.status_code == 403
    text = r.text
    assert str(settings.data_dir) not in text and str(settings.model_dir) not in text
