"""Data integrity under concurrency and abuse: one process call per output folder, validation bounded in time."""

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import start_server, stop_server, write_jsonl

CALLS = 8  # concurrent process calls per round
ROUNDS = 4
TIMEOUT = 3.0  # data.validate_timeout_seconds of the server under test


def _inputs(n: int, records: int) -> list[dict]:
    """Input k holds `records` conversations that all name input k (so a split tells which input it came from)."""
    return [
        [
            {
                "messages": [
                    {"role": "user", "content": f"input {k} question {i}?"},
                    {"role": "assistant", "content": f"input {k} answer {i}."},
                ]
            }
            for i in range(records)
        ]
        for k in range(n)
    ]


def _sources(folder: Path) -> set[int]:
    """The inputs the records of train/val/test in `folder` came from."""
    found = set()
    for split in ("train", "val", "test"):
        for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            found.add(int(json.loads(line)["messages"][0]["content"].split()[1]))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[tuple[str, Path]]:
    """A live server on the tiny model with a short validation budget; yields (url, data dir)."""
    work = tmp_path_factory.mktemp("integrity")
    url, proc = start_server(work, tiny_model_root, {"data": {"validate_timeout_seconds": TIMEOUT}})
    try:
        yield url, work / "data"
    finally:
        stop_server(proc)


def test_concurrent_process_calls_into_one_folder_publish_one_input_whole(server):
    url, data = server
    for k, records in enumerate(_inputs(CALLS, 2000)):
        write_jsonl(data / "inputs" / f"in{k}.jsonl", records)
    out = data / "shared"
    for round_ in range(ROUNDS):
        barrier = threading.Barrier(CALLS)

        def call(k: int, barrier: threading.Barrier = barrier) -> int:
            body = {"input_file": f"inputs/in{k}.jsonl", "output_dir": "shared", "overwrite": True}
            with httpx.Client(timeout=120) as client:
                barrier.wait()
                return client.post(f"{url}/api/data/process", json=body).status_code

        with ThreadPoolExecutor(CALLS) as pool:
            codes = list(pool.map(call, range(CALLS)))
        assert set(codes) <= {200, 409}, f"round {round_}: {codes}"
        winners = {k for k, code in enumerate(codes) if code == 200}
        assert winners, f"round {round_}: {codes}"
        sources = _sources(out)
        assert len(sources) == 1 and sources <= winners, f"round {round_}: splits from {sources}, 200s {winners}"
        marker = json.loads((out / ".wintrain-output.json").read_text(encoding="utf-8"))
        assert marker["kind"] == "process"
        assert sorted(p.name for p in out.iterdir()) == [
            ".wintrain-output.json",
            "test.jsonl",
            "train.jsonl",
            "val.jsonl",
        ]
    # No staging folder is left beside the output, only its lock file.
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".shared")) == [".shared.process-lock"]


def test_process_into_a_folder_another_server_holds_is_409(server):
    url, data = server
    write_jsonl(data / "inputs" / "in0.jsonl", _inputs(1, 20)[0])
    body = {"input_file": "inputs/in0.jsonl", "output_dir": "held"}
    lock = data / ".held.process-lock"
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another server sharing the data dir would
        r = httpx.post(f"{url}/api/data/process", json=body, timeout=60)
        assert r.status_code == 409, r.text
        assert "held" in r.json()["error"]["message"]
        assert not (data / "held").exists()
    finally:
        os.close(fd)
    r = httpx.post(f"{url}/api/data/process", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert (data / "held" / "train.jsonl").is_file()


def test_process_never_follows_a_link_at_the_lock_file(server):
    url, data = server
    write_jsonl(data / "inputs" / "in0.jsonl", _inputs(1, 20)[0])
    victim = data / "victim.txt"
    victim.write_text("keep me\n", encoding="utf-8")
    (data / ".linked.process-lock").symlink_to(victim)
    (data / ".dangling.process-lock").symlink_to(data / "created-through-link")
    for name in ("linked", "dangling"):
        r = httpx.post(
            f"{url}/api/data/process", json={"input_file": "inputs/in0.jsonl", "output_dir": name}, timeout=60
        )
        assert r.status_code == 409, r.text
        assert "process-lock" in r.json()["error"]["message"]
        assert not (data / name).exists()
    assert victim.read_text(encoding="utf-8") == "keep me\n"
    assert not (data / "created-through-link").exists()


def test_validating_one_huge_record_stops_at_the_deadline_and_health_stays_fast(server):
    url, data = server
    write_jsonl(data / "small.jsonl", _inputs(1, 3)[0])
    r = httpx.post(f"{url}/api/data/validate", json={"file_path": "small.jsonl"}, timeout=120)  # warms a worker up
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True and r.json()["token_stats"]["max"] > 0
    words = " ".join(f"w{i % 9973}x{i % 7}" for i in range(1_500_000))  # about 12 MB: a minute of tokenizing
    huge = {"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": "ok"}]}
    write_jsonl(data / "huge.jsonl", [huge])
    result: dict = {}

    def validate() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(f"{url}/api/data/validate", json={"file_path": "huge.jsonl"}, timeout=120)
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=validate)
    thread.start()
    worst = 0.0
    with httpx.Client(timeout=30) as client:
        while thread.is_alive():
            started = time.monotonic()
            assert client.get(f"{url}/health").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)
    thread.join()
    r = result["response"]
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "data.validate_timeout_seconds" in error["message"]
    assert error["details"]["timeout_seconds"] == TIMEOUT
    assert error["details"]["stage"] == "measuring token lengths" and error["details"]["record"] == 1
    assert result["seconds"] < TIMEOUT + 2.0, result["seconds"]
    assert worst < 0.5, f"/health took {worst:.2f} s while the validation ran"
    # The server validates normally afterwards (a fresh worker replaces the killed one).
    r = httpx.post(f"{url}/api/data/validate", json={"file_path": "small.jsonl"}, timeout=120)
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
