"""Outputs never nest (deleting one model deletes only it), and links planted in the allowed folders are never
written or served through (issue 26, defects 3 and 4)."""

import concurrent.futures
import json
import os
from pathlib import Path

import pytest
from pg import both_backends

from conftest import SAMPLE, add_task, wait_for, write_jsonl
from entity.task import TaskKind, TaskRow, TaskStatus, utcnow
from service.tasks import TaskStore
from util.errors import ConflictError
from util.files import OUTPUT_MARKER, claim_fresh, fresh_dir, publish, read_marker, write_json, write_marker

FAST = {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lora_config": {"r": 4}}
CHATS = [{"messages": r["conversations"]} for r in json.loads(SAMPLE.read_text())]
SECRET = "outside: must stay as it is\n"


@pytest.fixture
def dataset(settings) -> str:
    """A chat dataset in the data dir; its path relative to it."""
    write_jsonl(settings.data_dir / "d" / "train.jsonl", CHATS)
    return "d/train.jsonl"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every root, holding a file whose content must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET)
    return folder


def start(client, dataset: str, output_dir: str, **body):
    """POST /api/train/start for a one-step LoRA run."""
    payload = {"strategy": "lora", "dataset_path": dataset, "output_dir": output_dir, "config": dict(FAST)}
    return client.post("/api/train/start", json={**payload, **body})


def fake_model(folder: Path, task_id: str) -> Path:
    """A marked train output that loads as a model folder (config.json), as a finished task leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    write_marker(folder, TaskKind.train, task_id)
    return folder


def finished_task(client, task_id: str, folder: Path) -> None:
    """A succeeded train task row with this id and output folder."""
    with client.app.state.store.session() as s:
        s.add(
            TaskRow(
                id=task_id,
                kind=TaskKind.train,
                status=TaskStatus.succeeded,
                request={},
                output_dir=str(folder),
                created_at=utcnow(),
                finished_at=utcnow(),
            )
        )


def untouched(outside: Path) -> None:
    """The outside folder holds only its secret, unchanged."""
    assert (outside / "secret.txt").read_text() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


# -- defect 3: nested outputs -----------------------------------------------------------------------------


def test_the_outputs_root_is_never_an_output(client, dataset):
    """The report's case: output_dir "outputs" would hold every later default output."""
    r = start(client, dataset, "outputs")
    assert r.status_code == 403, r.text
    assert "the train outputs folder (model/outputs)" in r.json()["error"]["message"]
    r = client.post("/api/eval/evaluate", json={"dataset_path": dataset, "output_dir": "evals"})
    assert r.status_code == 403, r.text
    r = client.post("/api/export/onnx", json={"output_path": "exports"})
    assert r.status_code == 403, r.text
    r = client.post("/api/data/process", json={"input_file": dataset, "output_dir": "uploads"})
    assert r.status_code == 403, r.text
    r = start(client, dataset, "outputs/mine")  # a folder inside it is an output
    assert r.status_code == 202, r.text
    client.post(f"/api/train/cancel/{r.json()['task_id']}")


def test_output_inside_an_earlier_output_is_refused(client, settings, dataset):
    """Parent first: a finished output on disk holds no later output."""
    fake_model(settings.model_dir / "mine", "a" * 32)
    r = start(client, dataset, "mine/inner")
    assert r.status_code == 409, r.text
    message = r.json()["error"]["message"]
    assert "inside the output of task " + "a" * 32 in message and "'mine'" in message
    assert str(settings.model_dir) not in message  # named relative to its root, never by the server's path
    r = client.post("/api/export/archive", json={"output_path": "mine/x.tar.gz"})  # any kind, any output
    assert r.status_code == 409, r.text
    assert not (settings.model_dir / "mine" / "inner").exists()


def test_output_holding_an_earlier_output_is_refused(client, settings, dataset):
    """Child first: an output may not contain a finished one (overwrite or delete would take it along)."""
    fake_model(settings.model_dir / "outer" / "inner", "b" * 32)
    r = start(client, dataset, "outer", overwrite=True)
    assert r.status_code == 409, r.text
    assert "holds the output of task " + "b" * 32 in r.json()["error"]["message"]


@pytest.mark.parametrize("order", ["parent first", "child first"])
def test_nesting_with_a_queued_task_is_refused(client, settings, dataset, order):
    """A queued (here paused) task's output may not exist on disk yet: the store refuses the nesting."""
    parent, child = settings.model_dir / "q", settings.model_dir / "q" / "c"
    first, second = (parent, "q/c") if order == "parent first" else (child, "q")
    waiting = add_task(client, TaskStatus.paused, str(first))
    r = start(client, dataset, second)
    assert r.status_code == 409, r.text
    assert waiting in r.json()["error"]["message"]
    assert "nested" in r.json()["error"]["message"]


@both_backends
def test_eight_concurrent_nested_requests_accept_one(client, settings, dataset):
    """Eight requests at once for outputs nested in one another: exactly one is accepted, the rest get 409."""
    names = ["race/" + "/".join(str(i) for i in range(1, n + 1)) for n in range(8)]

    def submit(name: str) -> tuple[int, dict]:
        r = start(client, dataset, name)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, names))
    codes = sorted(code for code, _ in results)
    assert codes == [202] + [409] * 7, results
    accepted = next(body for code, body in results if code == 202)
    client.post(f"/api/train/cancel/{accepted['task_id']}")


@both_backends
def test_store_accepts_one_of_eight_nested_outputs_at_once(settings, tmp_path):
    """The store's check is atomic: of eight creates racing with nested outputs, one lands."""
    store = TaskStore(settings.database_url)
    root = tmp_path / "o"
    paths = [str(root.joinpath(*[str(i) for i in range(n)])) for n in range(8)]

    def create(path: str) -> bool:
        try:
            store.create(TaskKind.train, {}, path)
            return True
        except ConflictError:
            return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(create, paths)) == [False] * 7 + [True]
    # siblings are not nested: both land
    store.create(TaskKind.train, {}, str(tmp_path / "s" / "a"))
    store.create(TaskKind.train, {}, str(tmp_path / "s" / "ab"))


def test_deleting_a_model_deletes_only_its_own_folder(client, settings):
    """DELETE /v1/models/<A> removes A's marked folder only; a folder holding another output is refused whole."""
    outer_id, inner_id, other_id = "c" * 32, "d" * 32, "e" * 32
    outer = fake_model(settings.model_dir / "outputs" / "outer", outer_id)
    inner = fake_model(outer / "inner", inner_id)  # left nested by an older version
    other = fake_model(settings.model_dir / "outputs" / "other", other_id)
    for task_id, folder in [(outer_id, outer), (inner_id, inner), (other_id, other)]:
        finished_task(client, task_id, folder)

    r = client.delete(f"/v1/models/{outer_id}")
    assert r.status_code == 409, r.text
    assert "holds 1 other output" in r.json()["error"]["message"]
    assert (inner / "config.json").is_file() and (outer / "config.json").is_file()

    r = client.delete(f"/v1/models/{inner_id}")
    assert r.status_code == 200, r.text
    assert not inner.exists() and (outer / "config.json").is_file() and (other / "config.json").is_file()
    assert (settings.model_dir / "outputs").is_dir()

    r = client.delete(f"/v1/models/{outer_id}")  # it holds nothing else now
    assert r.status_code == 200, r.text
    assert not outer.exists() and (other / "config.json").is_file()


def test_deleting_a_model_whose_folder_was_replaced_deletes_nothing(client, settings, outside):
    """The marker must name the task: a folder replaced by another task's output, or a link, is left alone."""
    replaced = fake_model(settings.model_dir / "outputs" / "replaced", "f" * 32)
    task_id = add_task(client, TaskStatus.succeeded, str(replaced))
    r = client.delete(f"/v1/models/{task_id}")
    assert r.status_code == 409, r.text
    assert "does not carry the marker" in r.json()["error"]["message"]
    assert (replaced / "config.json").is_file()

    (outside / "config.json").write_text("{}")
    write_marker(outside, TaskKind.train, "0" * 32)
    linked = settings.model_dir / "outputs" / "linked"
    linked.symlink_to(outside, target_is_directory=True)
    task_id = add_task(client, TaskStatus.succeeded, str(linked))
    r = client.delete(f"/v1/models/{task_id}")
    assert r.status_code in (403, 409), r.text
    assert (outside / "secret.txt").read_text() == SECRET


# -- defect 4: planted links ------------------------------------------------------------------------------


def test_write_json_never_writes_through_a_planted_link(tmp_path, outside):
    """A link at the old fixed temporary name, or at the name itself, is replaced, never written through."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.json.tmp").symlink_to(outside / "secret.txt")
    (folder / "other.json").symlink_to(outside / "secret.txt")
    write_json(folder / "report.json", {"ok": 1})
    write_json(folder / "other.json", {"ok": 2})
    untouched(outside)
    assert json.loads((folder / "report.json").read_text()) == {"ok": 1}
    assert not (folder / "other.json").is_symlink() and json.loads((folder / "other.json").read_text()) == {"ok": 2}
    assert sorted(p.name for p in folder.iterdir()) == ["other.json", "report.json", "report.json.tmp"]


def test_publish_never_writes_through_planted_marker_links(tmp_path, outside):
    """Markers (a folder's, an archive's side marker) are written beside links planted at their temp names."""
    out = tmp_path / "exports" / "model"
    out.mkdir(parents=True)
    write_marker(out, TaskKind.export, "1" * 32)
    (out / (OUTPUT_MARKER + ".tmp")).symlink_to(outside / "secret.txt")
    staging = fresh_dir(out)
    (staging / "weights.bin").write_bytes(b"w")
    publish(staging, out, TaskKind.export, "2" * 32)
    assert read_marker(out)["task_id"] == "2" * 32

    archive = tmp_path / "exports" / "a.tar.gz"
    (archive.parent / f".a.tar.gz{OUTPUT_MARKER}.tmp").symlink_to(outside / "secret.txt")
    staged = tmp_path / "exports" / ".a.partial"
    staged.write_bytes(b"archive")
    publish(staged, archive, TaskKind.export, "3" * 32)
    assert read_marker(archive)["task_id"] == "3" * 32
    untouched(outside)


def test_a_link_planted_as_the_output_is_never_replaced(tmp_path, outside):
    """An output path that is a link is refused (never followed, never emptied)."""
    write_marker(outside, TaskKind.export, "4" * 32)
    out = tmp_path / "linked"
    out.symlink_to(outside, target_is_directory=True)
    staging = fresh_dir(out)
    with pytest.raises(ConflictError, match="symbolic link"):
        publish(staging, out, TaskKind.export, "5" * 32)
    with pytest.raises(ConflictError, match="symbolic link"):
        claim_fresh(out, TaskKind.export, "5" * 32)
    assert (outside / "secret.txt").read_text() == SECRET


def test_claim_fresh_drops_planted_links_and_keeps_the_rest(tmp_path, outside):
    """An earlier output is rebuilt fresh: its files stay, links and hard links to outside files go."""
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    write_marker(out, TaskKind.train, "6" * 32)
    (out / "trainer_log.jsonl").symlink_to(outside / "secret.txt")
    (out / "checkpoint-1" / "adapter_config.json").symlink_to(outside / "secret.txt")
    (out / "checkpoint-2").symlink_to(outside, target_is_directory=True)
    os.link(outside / "secret.txt", out / "README.md")  # a hard link: appending would write the outside file
    dropped = claim_fresh(out, TaskKind.train, "7" * 32)
    assert sorted(dropped) == ["README.md", "checkpoint-1/adapter_config.json", "checkpoint-2", "trainer_log.jsonl"]
    assert (out / "checkpoint-1" / "trainer_state.json").read_text() == "{}"
    assert (out / "README.md").read_text() == SECRET and os.stat(out / "README.md").st_nlink == 1
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert read_marker(out)["task_id"] == "7" * 32
    assert (out.stat().st_mode & 0o777) == 0o700  # private while the task writes it
    (out / "README.md").write_text("new")
    untouched(outside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "run"]  # no staging or old folder left


def test_a_failed_claim_puts_the_earlier_output_back(tmp_path, monkeypatch):
    """A claim that fails half way loses nothing: the checkpoints it was moving are back in place."""
    import util.files

    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "model.bin").write_bytes(b"weights")
    write_marker(out, TaskKind.train, "6" * 32)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(util.files, "write_marker", broken)
    with pytest.raises(OSError, match="disk full"):
        claim_fresh(out, TaskKind.train, "7" * 32)
    assert (out / "checkpoint-1" / "model.bin").read_bytes() == b"weights"
    assert read_marker(out)["task_id"] == "6" * 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_process_overwrite_never_writes_through_planted_links(client, settings, outside):
    """The report's case: links planted at train.jsonl.tmp and .wintrain-output.json.tmp in an earlier split."""
    src = write_jsonl(settings.data_dir / "in.jsonl", CHATS)
    body = {"input_file": src.name, "output_dir": "split", "overwrite": True}
    r = client.post("/api/data/process", json=body)
    assert r.status_code == 200, r.text
    out = settings.data_dir / "split"
    (out / "train.jsonl.tmp").symlink_to(outside / "secret.txt")
    (out / (OUTPUT_MARKER + ".tmp")).symlink_to(outside / "secret.txt")
    r = client.post("/api/data/process", json=body)
    assert r.status_code == 200, r.text
    untouched(outside)
    assert sum(1 for _ in (out / "train.jsonl").open()) == r.json()["splits"]["train"]["count"]


def test_swapped_file_content_is_refused(client, settings, outside):
    """/v1/files/{id}/content opens the stored file without following a link swapped in for it."""
    data = "".join(json.dumps(r) + "\n" for r in CHATS).encode()
    r = client.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    got = client.get(f"/v1/files/{file_id}/content")
    assert got.status_code == 200 and got.content == data
    stored = settings.data_dir / "files" / f"{file_id}.jsonl"
    stored.unlink()
    stored.symlink_to(outside / "secret.txt")
    got = client.get(f"/v1/files/{file_id}/content")
    assert got.status_code == 403, got.text
    assert "symbolic link" in got.json()["error"]["message"] and SECRET not in got.text
    stored.unlink()
    got = client.get(f"/v1/files/{file_id}/content")
    assert got.status_code == 404, got.text


def test_swapped_archive_download_is_refused(client, settings, outside):
    """/api/export/download/{id} refuses an archive (or its folder) swapped for a link."""
    exports = settings.model_dir / "exports"
    exports.mkdir(parents=True)
    archive = exports / "a.tar.gz"
    archive.write_bytes(b"archive bytes")
    task_id = add_task(client, TaskStatus.succeeded, str(archive), kind="export", request={"format": "archive"})
    got = client.get(f"/api/export/download/{task_id}")
    assert got.status_code == 200 and got.content == b"archive bytes"
    assert got.headers["content-disposition"] == 'attachment; filename="a.tar.gz"'

    archive.unlink()
    archive.symlink_to(outside / "secret.txt")
    got = client.get(f"/api/export/download/{task_id}")
    assert got.status_code == 403, got.text
    assert "symbolic link" in got.json()["error"]["message"] and SECRET not in got.text

    exports.rename(settings.model_dir / "exports-moved")  # the folder swapped for a link to a lookalike
    (outside / "a.tar.gz").write_bytes(b"not the export")
    exports.symlink_to(outside, target_is_directory=True)
    got = client.get(f"/api/export/download/{task_id}")
    assert got.status_code == 403, got.text


def test_swapped_task_output_file_is_refused(client, settings, outside):
    """/api/tasks/{id}/files/{path} refuses an output folder swapped for a link, even one inside the roots."""
    out = fake_model(settings.model_dir / "outputs" / "served", "8" * 32)
    task_id = add_task(client, TaskStatus.succeeded, str(out))
    assert client.get(f"/api/tasks/{task_id}/files/config.json").content == b"{}"
    other = fake_model(settings.model_dir / "outputs" / "elsewhere", "9" * 32)
    (other / "config.json").write_text('{"secret": 1}')
    out.rename(settings.model_dir / "outputs" / "served-old")
    out.symlink_to(other, target_is_directory=True)
    got = client.get(f"/api/tasks/{task_id}/files/config.json")
    assert got.status_code == 403, got.text
    assert "secret" not in got.text


def test_training_into_an_earlier_output_never_writes_through_planted_links(client, settings, dataset, outside):
    """The report's case: links planted in an earlier output at the names the trainer writes stay untouched."""
    r = start(client, dataset, "outputs/run")
    assert r.status_code == 202, r.text
    first = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert first["status"] == "succeeded", first["error"]
    out = settings.model_dir / "outputs" / "run"
    for name in ("trainer_log.jsonl", "training_args.json", "adapter_config.json", "README.md"):
        (out / name).unlink()
        (out / name).symlink_to(outside / "secret.txt")
    (outside / "ckpt").mkdir()
    os.rename(out / "checkpoint-1", settings.model_dir / "old-checkpoint")
    (out / "checkpoint-1").symlink_to(outside / "ckpt", target_is_directory=True)

    r = start(client, dataset, "outputs/run", overwrite=True)
    assert r.status_code == 202, r.text
    second = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert second["status"] == "succeeded", second["error"]
    assert (outside / "secret.txt").read_text() == SECRET
    assert list((outside / "ckpt").iterdir()) == []
    for name in ("trainer_log.jsonl", "training_args.json", "adapter_config.json", "README.md", "checkpoint-1"):
        assert (out / name).exists() and not (out / name).is_symlink(), name
    assert json.loads((out / "training_args.json").read_text())["strategy"] == "lora"
    assert read_marker(out)["task_id"] == second["id"]
    assert (out.stat().st_mode & 0o777) != 0o700  # released when the task ended
    events = client.get(f"/api/train/logs/{second['id']}").json()["items"]
    assert any("dropped" in e["message"] and "trainer_log.jsonl" in e["message"] for e in events)


def test_other_ranks_wait_for_this_start_s_claim_not_an_earlier_one(tmp_path):
    """Rank 0 rebuilds the output folder at each start: a marker an earlier start left does not release rank 1."""
    import threading
    from datetime import datetime
    from types import SimpleNamespace

    from service.train.runner import claim_output_dir, wait_for_claim

    class Store:
        """The started_at of the task's current start, as every rank reads it from the store."""

        started_at = datetime(2026, 1, 1, 12, 0, 0)

        def get(self, task_id: str) -> SimpleNamespace:
            return SimpleNamespace(started_at=self.started_at)

        def add_event(self, *args: object) -> None:
            pass

    store, out = Store(), tmp_path / "out"
    claim_output_dir(out, "t1", store)  # the first start
    wait_for_claim(out, "t1", timeout=1, store=store)
    store.started_at = datetime(2026, 1, 1, 13, 0, 0)  # the task started again (resume)
    with pytest.raises(RuntimeError, match="did not claim"):
        wait_for_claim(out, "t1", timeout=0.3, store=store)
    timer = threading.Timer(0.3, claim_output_dir, (out, "t1", store))
    timer.start()
    wait_for_claim(out, "t1", timeout=10, store=store)
    timer.join()
