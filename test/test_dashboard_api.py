"""APIs the dashboard reads: task output files (sandboxed downloads), dataset listing/preview, length histogram."""

import os
from concurrent.futures import ThreadPoolExecutor

from conftest import SAMPLE, add_task, write_jsonl
from entity.task import TaskStatus
from service.data import histogram

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}


def _task_with_files(client, settings) -> tuple[str, object]:
    out = settings.model_dir / "outputs" / "t1"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "adapter_config.json").write_text('{"r": 4}')
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / ".hidden").write_text("no")
    secret = settings.data_dir.parent / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, out / "leak.txt")
    return add_task(client, TaskStatus.succeeded, str(out)), out


def test_task_files_list_and_download(client, settings):
    task_id, _ = _task_with_files(client, settings)
    r = client.get(f"/api/tasks/{task_id}/files")
    assert r.status_code == 200, r.text
    paths = [f["path"] for f in r.json()["items"]]
    assert paths == ["adapter_config.json", "checkpoint-2/trainer_state.json"]  # no hidden file, no outward link
    got = client.get(f"/api/tasks/{task_id}/files/adapter_config.json")
    assert got.status_code == 200 and got.json() == {"r": 4}
    assert "attachment" in got.headers["content-disposition"]
    nested = client.get(f"/api/tasks/{task_id}/files/checkpoint-2/trainer_state.json")
    assert nested.status_code == 200


def test_task_file_download_stays_inside_the_output_folder(client, settings):
    task_id, _ = _task_with_files(client, settings)
    for bad in ("leak.txt", "..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd", "checkpoint-2%2F..%2F..%2F..%2Fsecret.txt"):
        r = client.get(f"/api/tasks/{task_id}/files/{bad}")
        assert r.status_code == 403, (bad, r.text)
        assert r.json()["error"]["type"] == "forbidden_path"
        assert "top secret" not in r.text
    for missing in (".hidden", "nope.bin", "checkpoint-2"):
        r = client.get(f"/api/tasks/{task_id}/files/{missing}")
        assert r.status_code == 404, (missing, r.text)
        assert r.json()["error"]["type"] == "not_found"


def test_task_files_errors(client, settings):
    assert client.get("/api/tasks/" + "0" * 32 + "/files").status_code == 404
    no_output = add_task(client, TaskStatus.failed, None)
    r = client.get(f"/api/tasks/{no_output}/files")
    assert r.status_code == 404 and "no output folder" in r.json()["error"]["message"]
    not_yet = add_task(client, TaskStatus.running, str(settings.model_dir / "outputs" / "later"))
    assert "no output yet" in client.get(f"/api/tasks/{not_yet}/files").json()["error"]["message"]
    outside = add_task(client, TaskStatus.succeeded, "/etc")
    r = client.get(f"/api/tasks/{outside}/files/passwd")
    assert r.status_code == 403, r.text


def test_task_files_under_concurrent_requests(client, settings):
    task_id, _ = _task_with_files(client, settings)
    urls = [f"/api/tasks/{task_id}/files"] * 4 + [f"/api/tasks/{task_id}/files/..%2F..%2Fsecret.txt"] * 4
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda u: client.get(u).status_code, urls))
    assert codes == [200] * 4 + [403] * 4


def test_dataset_files_and_preview(client, settings):
    write_jsonl(settings.data_dir / "uploads" / "mix.jsonl", [GOOD, "{not json", {"foo": 1}, ALPACA])
    (settings.data_dir / "uploads" / "notes.txt").write_text("x")
    listed = client.get("/api/data/files").json()
    assert [f["file_path"] for f in listed["items"]] == ["uploads/mix.jsonl"]
    r = client.get("/api/data/preview", params={"file_path": "uploads/mix.jsonl", "limit": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["next_offset"] == 3
    first, bad_json, bad_shape = body["items"]
    assert (first["line"], first["format"], first["messages"][1]["content"]) == (1, "messages", "4")
    assert bad_json["line"] == 2 and bad_json["error"].startswith("bad JSON")
    assert bad_shape["line"] == 3 and bad_shape["error"]
    rest = client.get("/api/data/preview", params={"file_path": "uploads/mix.jsonl", "offset": 3}).json()
    assert [i["format"] for i in rest["items"]] == ["alpaca"] and rest["next_offset"] is None


def test_dataset_preview_errors(client):
    assert client.get("/api/data/preview", params={"file_path": "../../etc/passwd"}).status_code == 403
    assert client.get("/api/data/preview", params={"file_path": "missing.jsonl"}).status_code == 404
    r = client.get("/api/data/preview", params={"file_path": "x.jsonl", "limit": 0})
    assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"


def test_validate_reports_a_length_histogram(client, settings):
    path = settings.data_dir / "sample.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SAMPLE.read_bytes())
    stats = client.post("/api/data/validate", params={"file_path": "sample.json"}).json()["token_stats"]
    bins = stats["histogram"]
    assert 1 <= len(bins) <= 20
    assert (
        sum(b["count"] for b in bins)
        == client.post("/api/data/validate", params={"file_path": "sample.json"}).json()["valid_count"]
    )
    assert bins[0]["start"] == stats["min"] and bins[-1]["start"] <= stats["max"] < bins[-1]["end"]


def test_histogram_bins():
    assert [(b.start, b.end, b.count) for b in histogram([5])] == [(5, 6, 1)]
    bins = histogram(list(range(100)), bins=10)
    assert len(bins) == 10 and all(b.count == 10 for b in bins)
    assert [b.count for b in histogram([1, 1, 2, 40], bins=4)] == [3, 0, 0, 1]
