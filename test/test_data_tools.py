"""Dataset tools: merging several inputs, listing datasets, previewing records, deleting uploads."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import write_jsonl


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}


def _upload(client, name: str, records: list) -> dict:
    body = "\n".join(json.dumps(r) if not isinstance(r, str) else r for r in records) + "\n"
    r = client.post("/api/data/upload", files={"file": (name, body.encode())})
    assert r.status_code == 201, r.text
    return r.json()


def test_process_merges_input_files_in_order_and_deduplicates_across_them(client, settings):
    write_jsonl(settings.data_dir / "one.jsonl", [_chat(i) for i in range(6)])
    write_jsonl(settings.data_dir / "two.jsonl", [_chat(4), _chat(5), SHAREGPT, "{broken", _chat(6)])
    split = {"train_ratio": 1.0, "val_ratio": 0.0, "test_ratio": 0.0, "shuffle": False}
    body = {"input_files": ["one.jsonl", "two.jsonl"], "output_dir": "merged", "split_config": split}
    r = client.post("/api/data/process", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["total"], out["kept"], out["duplicates_dropped"], out["invalid_dropped"]) == (11, 8, 2, 1)
    assert out["input_files"] == ["one.jsonl", "two.jsonl"]  # relative to the data dir, as they were sent
    lines = [json.loads(x) for x in (settings.data_dir / "merged" / "train.jsonl").read_text().splitlines()]
    firsts = [x["messages"][0]["content"] for x in lines]
    assert firsts == [f"question {i}" for i in range(6)] + ["Hi", "question 6"]  # merge order, shuffle off
    # The single input_file still works; both or neither is refused.
    one = {"input_file": "one.jsonl", "output_dir": "single"}
    assert client.post("/api/data/process", json=one).status_code == 200
    both = client.post("/api/data/process", json={**one, "input_files": ["two.jsonl"], "output_dir": "x"})
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
    assert client.post("/api/data/process", json={"output_dir": "y"}).status_code == 422
    outside = client.post("/api/data/process", json={"input_files": ["one.jsonl", "/etc/passwd"], "output_dir": "z"})
    assert outside.status_code == 403
    assert not (settings.data_dir / "z").exists()


def test_files_lists_uploads_and_processed_sets_with_counts_and_format(client, settings):
    _upload(client, "chats.jsonl", [_chat(i) for i in range(5)] + ["{bad"])
    _upload(client, "share.json", [SHAREGPT, SHAREGPT])  # a JSONL file named .json still parses line by line
    client.post("/api/data/process", json={"input_file": "uploads/chats.jsonl", "output_dir": "proc"})
    (settings.data_dir / "uploads" / ".half.jsonl.part").write_text("{}\n")
    r = client.get("/api/data/files")
    assert r.status_code == 200, r.text
    items = {f["file_path"]: f for f in r.json()["items"]}
    assert set(items) == {"uploads/chats.jsonl", "uploads/share.json", "proc/train.jsonl", "proc/val.jsonl",
                          "proc/test.jsonl"}  # fmt: skip
    chats = items["uploads/chats.jsonl"]
    assert (chats["kind"], chats["records"], chats["valid_records"], chats["format"]) == ("upload", 6, 5, "messages")
    assert chats["size_bytes"] == (settings.data_dir / "uploads" / "chats.jsonl").stat().st_size
    assert items["uploads/share.json"]["format"] == "sharegpt"
    assert items["proc/train.jsonl"]["kind"] == "processed" and items["proc/train.jsonl"]["records"] == 4
    uploads = client.get("/api/data/files", params={"kind": "upload"}).json()["items"]
    assert {f["file_path"] for f in uploads} == {"uploads/chats.jsonl", "uploads/share.json"}
    assert client.get("/api/data/files", params={"kind": "nope"}).status_code == 422


def test_preview_normalises_records_and_pages(client, settings):
    write_jsonl(settings.data_dir / "p.jsonl", [SHAREGPT, "{bad", _chat(1), _chat(2), {"x": 1}])
    r = client.get("/api/data/preview", params={"file_path": "p.jsonl", "limit": 3})
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["next_offset"] == 3
    first, bad, third = page["items"]
    assert first["format"] == "sharegpt" and first["messages"][0] == {"role": "user", "content": "Hi"}
    assert bad["line"] == 2 and "bad JSON" in bad["error"]
    assert third["messages"][1]["content"] == "answer 1"
    rest = client.get("/api/data/preview", params={"file_path": "p.jsonl", "offset": 3, "limit": 3}).json()
    assert [x["line"] for x in rest["items"]] == [4, 5] and rest["next_offset"] is None
    assert "unknown format" in rest["items"][1]["error"]
    for params, status in [
        ({"file_path": "/etc/passwd"}, 403),
        ({"file_path": "missing.jsonl"}, 404),
        ({"file_path": "p.jsonl", "limit": 0}, 422),
        ({"file_path": "p.jsonl", "offset": -1}, 422),
        ({}, 422),
    ]:
        assert client.get("/api/data/preview", params=params).status_code == status, params


@pytest.mark.parametrize(
    ("file_path", "status"),
    [
        ("../tasks.db", 422),
        ("uploads/../../secret.jsonl", 422),
        ("/etc/passwd", 422),
        ("proc/train.jsonl", 422),
        ("train.jsonl", 404),
        (".uploaded", 422),
        ("", 422),
    ],
)
def test_delete_refuses_anything_but_an_upload(client, settings, file_path, status):
    _upload(client, "keep.jsonl", [_chat(1)])
    write_jsonl(settings.data_dir / "secret.jsonl", [_chat(2)])
    r = client.delete("/api/data/files", params={"file_path": file_path})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"type", "message", "details"}
    assert (settings.data_dir / "secret.jsonl").exists() and (settings.data_dir / "uploads" / "keep.jsonl").exists()


def test_delete_refuses_files_not_uploaded_and_links_out(client, settings, tmp_path):
    uploads = settings.data_dir / "uploads"
    _upload(client, "real.jsonl", [_chat(1)])
    write_jsonl(uploads / "placed.jsonl", [_chat(1)])  # put there by something other than an upload
    outside = tmp_path / "outside.jsonl"
    outside.write_text("{}\n")
    (uploads / "link.jsonl").symlink_to(outside)
    assert client.delete("/api/data/files", params={"file_path": "placed.jsonl"}).status_code == 403
    assert client.delete("/api/data/files", params={"file_path": "uploads/link.jsonl"}).status_code == 403
    assert (uploads / "placed.jsonl").exists() and outside.exists()
    r = client.delete("/api/data/files", params={"file_path": "uploads/real.jsonl"})
    assert r.status_code == 200 and r.json()["deleted"]
    assert not (uploads / "real.jsonl").exists()
    assert "uploads/real.jsonl" not in {f["file_path"] for f in client.get("/api/data/files").json()["items"]}


def test_eight_concurrent_deletes(client, settings):
    for i in range(8):
        _upload(client, f"f{i}.jsonl", [_chat(i)])

    def delete(name: str) -> int:
        return client.delete("/api/data/files", params={"file_path": name}).status_code

    with ThreadPoolExecutor(8) as pool:
        same = list(pool.map(delete, ["uploads/f0.jsonl"] * 8))
        different = list(pool.map(delete, [f"f{i}.jsonl" for i in range(1, 8)] + ["f0.jsonl"]))
    assert sorted(same) == [200] + [404] * 7
    assert different == [200] * 7 + [404]
    assert list((settings.data_dir / "uploads").glob("*.jsonl")) == []
    # Re-uploading a deleted name works again.
    _upload(client, "f0.jsonl", [_chat(0)])


def test_delete_refuses_an_upload_a_task_still_reads(client, settings):
    from conftest import add_task
    from entity.task import TaskStatus

    _upload(client, "busy.jsonl", [_chat(1)])
    path = str(settings.data_dir / "uploads" / "busy.jsonl")
    running = add_task(client, TaskStatus.running, None, request={"resolved": {"dataset_paths": [path]}})
    r = client.delete("/api/data/files", params={"file_path": "uploads/busy.jsonl"})
    assert r.status_code == 409 and r.json()["error"]["details"]["task_id"] == running
    # Paused, the task will read the file again when it resumes.
    client.app.state.store.transition(running, TaskStatus.paused, (TaskStatus.running,))
    r = client.delete("/api/data/files", params={"file_path": "uploads/busy.jsonl"})
    assert r.status_code == 409 and r.json()["error"]["details"]["task_id"] == running
    client.app.state.store.transition(running, TaskStatus.cancelled, (TaskStatus.paused,))
    assert client.delete("/api/data/files", params={"file_path": "uploads/busy.jsonl"}).status_code == 200
