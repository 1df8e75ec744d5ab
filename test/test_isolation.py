"""Workers never see the API keys; uploads of one name don't collide; kind-specific routes; 403s don't leak roots."""

import concurrent.futures
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from conftest import add_task, write_jsonl
from entity.task import TaskStatus
from main import create_app
from util.settings import AuthSettings

KEY = "k-never-in-a-worker-7f3a"
OTHER_KEY = "k-env-only-91c2"
CONV = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def environ_of(pid: int) -> dict[str, str]:
    """A live process's environment, read from Linux /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode("utf-8", "replace").split("\0") if "=" in entry)


def assert_no_keys(pid: int) -> dict[str, str]:
    """The worker's environment holds neither key (anywhere, settings JSON included) nor any auth variable."""
    env = environ_of(pid)
    assert "API_KEYS" not in env
    assert not [name for name in env if name.upper().startswith("WT_AUTH__")]
    blob = "\n".join(f"{k}={v}" for k, v in env.items())
    assert KEY not in blob and OTHER_KEY not in blob
    assert env.get("WT_UNRELATED_SETTING") == "kept"  # the rest of the environment still reaches the worker
    return env


def test_run_and_task_workers_get_no_api_keys(settings, monkeypatch):
    monkeypatch.setenv("API_KEYS", f"{KEY},{OTHER_KEY}")
    monkeypatch.setenv("WT_AUTH__API_KEYS", f'["{OTHER_KEY}"]')
    monkeypatch.setenv("WT_UNRELATED_SETTING", "kept")
    secured = settings.model_copy(update={"auth": AuthSettings(api_keys=[SecretStr(KEY)])})
    write_jsonl(settings.data_dir / "d.jsonl", [CONV] * 8)
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(secured), headers=headers) as client:
        r = client.post("/v1/runs", json={"lora": {"r": 4, "alpha": 8}})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        pid = client.app.state.run_service.store.get_run(run_id).pid
        assert pid
        assert_no_keys(pid)
        body = {"strategy": "lora", "dataset_path": "d.jsonl", "config": {"max_steps": 200, "save_steps": 1000}}
        r = client.post("/api/train/start", json=body)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + 60
        while not (task_pid := client.app.state.store.get(task_id).pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_no_keys(task_pid)  # read while the worker starts up (200 steps keep it alive well beyond)
        assert client.post(f"/api/train/cancel/{task_id}").status_code == 200
        assert client.delete(f"/v1/runs/{run_id}").status_code == 200


@pytest.mark.parametrize("overwrite", [False, True])
def test_eight_concurrent_uploads_of_one_name_do_not_collide(client, settings, overwrite):
    payloads = [(f"{i}" * 200_000).encode() for i in range(8)]  # 200 kB each: several chunks, slow enough to overlap

    def upload(data: bytes) -> int:
        files = {"file": ("same.jsonl", data)}
        return client.post("/api/data/upload", files=files, data={"overwrite": str(overwrite).lower()}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, payloads))
    if overwrite:
        assert codes == [201] * 8
    else:  # exactly one wins; the others are told the name is taken
        assert sorted(codes) == [201] + [409] * 7, codes
    stored = (settings.data_dir / "uploads" / "same.jsonl").read_bytes()
    assert stored in payloads  # one whole upload, never a mix of two
    listed = sorted(p.name for p in (settings.data_dir / "uploads").iterdir() if p.name != ".uploaded")
    assert listed == ["same.jsonl"]  # no temp left (.uploaded holds the upload markers)


def test_status_routes_answer_only_for_their_own_kind(client):
    train = add_task(client, TaskStatus.succeeded, None, kind="train")
    evaluation = add_task(client, TaskStatus.succeeded, None, kind="eval")
    export = add_task(client, TaskStatus.succeeded, None, kind="export")
    assert client.get(f"/api/eval/status/{evaluation}").status_code == 200
    assert client.get(f"/api/export/status/{export}").status_code == 200
    for route, task_id in (("eval", train), ("eval", export), ("export", train), ("export", evaluation)):
        r = client.get(f"/api/{route}/status/{task_id}")
        assert r.status_code == 404, (route, r.text)
        assert r.json()["error"]["type"] == "not_found"
    # The generic status route still shows every task.
    for task_id in (train, evaluation, export):
        assert client.get(f"/api/train/status/{task_id}").status_code == 200


def test_a_403_never_reveals_the_servers_roots(client, settings):
    calls = [
        ("/api/data/validate", {"file_path": "/etc/passwd"}),
        ("/api/data/validate", {"file_path": "../../../etc/passwd"}),
        ("/api/data/process", {"input_file": "/etc/hosts", "output_dir": "x"}),
        ("/api/train/start", {"strategy": "lora", "dataset_path": "../outside.jsonl"}),
        ("/api/export/archive", {"model": "/etc"}),
        ("/api/inference/chat", {"model": "/tmp", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for route, body in calls:
        r = client.post(route, json=body)
        assert r.status_code == 403, (route, r.text)
        text = r.text
        for root in (settings.data_dir, settings.model_dir, settings.data_dir.parent):
            assert str(root) not in text, (route, text)
