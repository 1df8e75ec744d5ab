"""Data API: validate (formats, errors, token stats), process (split), upload, and the path sandbox."""

import json

import pytest

from conftest import SAMPLE, write_jsonl

CONV = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}


def validate(client, path: str, **params):
    return client.post("/api/data/validate", params={"file_path": path, **params})


def test_validate_accepts_every_format(client, settings):
    gsm8k = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7.\n#### 7"}
    qa = {"query": "Capital of France?", "response": "Paris"}
    write_jsonl(settings.data_dir / "mixed.jsonl", [CONV, MESSAGES, SHAREGPT, ALPACA, CONV, gsm8k, qa])
    r = validate(client, "mixed.jsonl")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is True
    assert (body["total"], body["valid_count"], body["invalid_count"]) == (7, 7, 0)
    assert body["formats"] == {"conversations": 2, "messages": 1, "sharegpt": 1, "alpaca": 1, "gsm8k": 1, "qa": 1}
    stats = body["token_stats"]
    assert 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
    assert stats["over_max_length"] == 0


def test_validate_json_array_and_body_path(client, settings):
    (settings.data_dir / "arr.json").write_text(json.dumps([CONV, SHAREGPT]), encoding="utf-8")
    r = client.post("/api/data/validate", json={"file_path": "arr.json"})
    assert r.status_code == 200, r.text
    assert r.json()["formats"] == {"conversations": 1, "sharegpt": 1}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ('{"conversations": [', "bad JSON"),
        ({"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        (
            {"conversations": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]},
            "empty content",
        ),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "does not alternate",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            "does not alternate",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "end with an assistant turn",
        ),
        ({"text": "plain"}, "unknown format"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_validate_reports_each_error_with_line(client, settings, record, reason):
    write_jsonl(settings.data_dir / "bad.jsonl", [CONV, record, CONV])
    r = validate(client, "bad.jsonl")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is False
    assert (body["total"], body["valid_count"], body["invalid_count"]) == (3, 2, 1)
    assert len(body["errors"]) == 1
    assert body["errors"][0]["line"] == 2
    assert reason in body["errors"][0]["reason"]


def test_validate_caps_error_list_and_counts_over_length(client, settings):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(settings.data_dir / "many.jsonl", ["{broken"] * 60 + [long, CONV])
    body = validate(client, "many.jsonl", max_length=64).json()
    assert body["invalid_count"] == 60
    assert len(body["errors"]) == 50
    assert body["errors_truncated"] is True
    assert body["token_stats"]["max_length"] == 64
    assert body["token_stats"]["over_max_length"] == 1


def test_validate_requires_a_path(client):
    r = client.post("/api/data/validate")
    assert r.status_code == 422
    assert "file_path" in r.json()["error"]["message"]


def test_missing_file_is_404(client):
    r = validate(client, "nope.jsonl")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("path", ["/etc/passwd", "../../etc/passwd", "../outside.jsonl"])
def test_paths_outside_roots_are_forbidden(client, path):
    r = validate(client, path)
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["type"] == "forbidden_path"
    assert "outside the allowed roots" in err["message"]


def test_process_outside_roots_is_forbidden(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [CONV])
    r = client.post("/api/data/process", json={"input_file": "d.jsonl", "output_dir": "/tmp/evil"})
    assert r.status_code == 403


def _records(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(n)
    ]


def _process(client, out: str, seed: int = 7, **extra):
    split = {"train_ratio": 0.6, "val_ratio": 0.2, "test_ratio": 0.2, "shuffle": True, "seed": seed}
    return client.post(
        "/api/data/process", json={"input_file": "in.jsonl", "output_dir": out, "split_config": split, **extra}
    )


def test_process_splits_normalises_and_drops(client, settings):
    records = [*_records(20), SHAREGPT, SHAREGPT, "{bad json", {"messages": [{"role": "user", "content": "q"}]}]
    write_jsonl(settings.data_dir / "in.jsonl", records)
    r = _process(client, "split_a")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["total"], body["kept"], body["invalid_dropped"], body["duplicates_dropped"]) == (24, 21, 2, 1)
    counts = {k: v["count"] for k, v in body["splits"].items()}
    assert counts == {"train": 13, "val": 4, "test": 4}
    lines = []
    for split in body["splits"].values():
        lines += [json.loads(x) for x in open(settings.data_dir / split["path"], encoding="utf-8")]
    assert len(lines) == 21
    assert all(set(x) == {"messages"} for x in lines)
    assert {"role": "user", "content": "Name a color."} in [m for x in lines for m in x["messages"]]


def test_process_is_deterministic_per_seed(client, settings):
    write_jsonl(settings.data_dir / "in.jsonl", _records(30))
    a = _process(client, "a").json()
    b = _process(client, "b").json()
    c = _process(client, "c", seed=8).json()

    def read(body):
        return {k: open(settings.data_dir / v["path"], encoding="utf-8").read() for k, v in body["splits"].items()}

    assert read(a) == read(b)
    assert read(a)["train"] != read(c)["train"]


def test_process_ratio_errors_and_overwrite(client, settings):
    write_jsonl(settings.data_dir / "in.jsonl", _records(10))
    bad = client.post(
        "/api/data/process",
        json={
            "input_file": "in.jsonl",
            "output_dir": "x",
            "split_config": {"train_ratio": 0.7, "val_ratio": 0.2, "test_ratio": 0.2},
        },
    )
    assert bad.status_code == 422
    assert "must equal 1" in bad.json()["error"]["message"]
    assert _process(client, "same").status_code == 200
    again = _process(client, "same")
    assert again.status_code == 409
    assert "overwrite" in again.json()["error"]["message"]
    assert _process(client, "same", overwrite=True).status_code == 200


def test_process_into_a_file_is_409(client, settings):
    write_jsonl(settings.data_dir / "in.jsonl", _records(5))
    (settings.data_dir / "taken").write_text("not a folder")
    r = _process(client, "taken")
    assert r.status_code == 409
    assert "is a file" in r.json()["error"]["message"]
    assert (settings.data_dir / "taken").read_text() == "not a folder"


def test_process_with_no_valid_records_is_422(client, settings):
    write_jsonl(settings.data_dir / "in.jsonl", ["{nope", {"text": "x"}])
    r = _process(client, "empty")
    assert r.status_code == 422


def test_upload_stores_file_and_refuses_overwrite(client, settings):
    content = SAMPLE.read_bytes()
    r = client.post("/api/data/upload", files={"file": ("../../sneaky.json", content, "application/json")})
    assert r.status_code == 201, r.text
    stored = r.json()["file_path"]
    assert stored == "uploads/sneaky.json"  # relative to the data dir, never the server's absolute path
    assert (settings.data_dir / stored).read_bytes() == content
    assert client.post("/api/data/upload", files={"file": ("sneaky.json", b"[]")}).status_code == 409
    r = client.post("/api/data/upload", files={"file": ("sneaky.json", b"[]")}, data={"overwrite": "true"})
    assert r.status_code == 201
    assert validate(client, "uploads/sneaky.json").json()["total"] == 0


def test_sample_dataset_is_valid(client, settings):
    up = client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    body = validate(client, up.json()["file_path"]).json()
    assert body["valid"] is True
    assert body["total"] >= 30


def test_upload_over_the_size_limit_is_refused_and_leaves_nothing(client, settings):
    assert settings.data.max_upload_mb == 512
    client.app.state.data_service.settings = settings.model_copy(
        update={"data": settings.data.model_copy(update={"max_upload_mb": 1})}
    )
    r = client.post("/api/data/upload", files={"file": ("big.jsonl", b"x" * (1024 * 1024 + 1))})
    assert r.status_code == 413
    assert "1 MB limit" in r.json()["error"]["message"]
    assert list((settings.data_dir / "uploads").iterdir()) == []


def test_validate_with_an_adapter_whose_base_is_gone_is_404(client, settings):
    write_jsonl(settings.data_dir / "d.jsonl", [CONV])
    orphan = settings.model_dir / "orphan"
    orphan.mkdir()
    gone = str(settings.model_dir / "gone-base")  # inside the roots, so not refused: just missing
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": gone}))
    r = client.post("/api/data/validate", json={"file_path": "d.jsonl", "model": "orphan"})
    assert r.status_code == 404
    assert "base model" in r.json()["error"]["message"]
