"""The sandbox holds: no output replaces a root, the task database or a user's folder; client files can't point out."""

import json
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import add_task, make_settings, write_jsonl
from entity.task import TaskKind, TaskStatus
from main import create_app
from service.export import run_export
from util.errors import ConflictError, ForbiddenPathError
from util.files import OUTPUT_MARKER, default_dir_mode, fresh_dir, publish, read_marker, write_marker
from util.settings import Settings

IMPORTANT = "a user's file that no request may delete\n"
CONV = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture
def guarded(tmp_path: Path, tiny_model_root: Path) -> Settings:
    """Settings with an outside allowed root, a root nested in the model dir, and the DB in a data-dir folder."""
    base = make_settings(tmp_path, tiny_model_root)
    shared = tmp_path / "shared"
    nested = base.model_dir / "teams" / "alpha"
    for root in (shared, nested):
        root.mkdir(parents=True)
        (root / "keep.txt").write_text(IMPORTANT)
    paths = base.paths.model_copy(
        update={"allowed_roots": [shared, nested], "db_path": base.data_dir / "state" / "tasks.db"}
    )
    return base.model_copy(update={"paths": paths})


@pytest.fixture
def world(guarded: Settings, adapter_dir: Path) -> dict:
    """A client on `guarded` with data worth protecting: uploads, a finished task, and users' folders."""
    data, model = guarded.data_dir, guarded.model_dir
    write_jsonl(data / "uploads" / "keep.jsonl", [CONV, CONV])
    for folder in (data / "victim", model / "victim"):
        folder.mkdir(parents=True)
        (folder / "IMPORTANT.txt").write_text(IMPORTANT)
    (model / "victim.tar.gz").write_text(IMPORTANT)  # a user's own archive
    with TestClient(create_app(guarded)) as client:
        sentinel = add_task(client, TaskStatus.succeeded, str(adapter_dir))
        yield {"client": client, "sentinel": sentinel, "adapter": adapter_dir}


def assert_intact(settings: Settings, world: dict) -> None:
    """The DB still lists the finished task, and every protected file is still in place."""
    client, data, model = world["client"], settings.data_dir, settings.model_dir
    assert settings.paths.db_path.is_file()
    listed = client.get("/api/train/tasks").json()
    assert [t["id"] for t in listed["items"]] == [world["sentinel"]], "a request created or lost a task"
    assert (data / "uploads" / "keep.jsonl").is_file()
    for important in (
        data / "victim" / "IMPORTANT.txt",
        model / "victim" / "IMPORTANT.txt",
        model / "victim.tar.gz",
        model / "teams" / "alpha" / "keep.txt",
        settings.paths.allowed_roots[0] / "keep.txt",
    ):
        assert important.read_text() == IMPORTANT, important
    assert sorted(p.name for p in (model / "victim").iterdir()) == ["IMPORTANT.txt"]
    assert (settings.base_model_path() / "config.json").is_file()
    assert (world["adapter"] / "adapter_config.json").is_file()


def bodies(world: dict) -> dict[str, tuple[str, dict, str, str]]:
    """Every output field: (route, body without the output, field name, the folder relative paths start from)."""
    return {
        "export onnx": ("/api/export/onnx", {"overwrite": True}, "output_path", "model"),
        "export merged": (
            "/api/export/merged",
            {"model": str(world["adapter"]), "overwrite": True},
            "output_path",
            "model",
        ),
        "export archive": ("/api/export/archive", {"overwrite": True}, "output_path", "model"),
        "train": (
            "/api/train/start",
            {"strategy": "lora", "dataset_path": "uploads/keep.jsonl", "overwrite": True},
            "output_dir",
            "model",
        ),
        "eval": ("/api/eval/evaluate", {"dataset_path": "uploads/keep.jsonl"}, "output_dir", "data"),
        "process": ("/api/data/process", {"input_file": "uploads/keep.jsonl", "overwrite": True}, "output_dir", "data"),
    }


FIELDS = ["export onnx", "export merged", "export archive", "train", "eval", "process"]


def forbidden_targets(settings: Settings, relative_to: str) -> list[str]:
    """Every root, ".", "..", an ancestor of a root, the DB folder and the base-model store, as a client writes them."""
    roots = [settings.data_dir, settings.model_dir, *settings.paths.allowed_roots]
    targets = [str(r) for r in roots] + [".", "..", str(settings.data_dir.parent), "./"]
    targets += [str(settings.paths.db_path.parent), str(settings.model_dir / "base")]
    if relative_to == "model":
        targets += ["teams", "base", "base/tiny-llama", "outputs/.."]  # teams holds an allowed root
    else:
        targets += ["state", "state/..", "uploads/.."]  # state is the DB's folder
    return targets


@pytest.mark.parametrize("field", FIELDS)
def test_no_output_field_accepts_a_root_an_ancestor_or_the_db_folder(guarded, world, field):
    route, body, name, relative_to = bodies(world)[field]
    for target in forbidden_targets(guarded, relative_to):
        r = world["client"].post(route, json={**body, name: target})
        assert r.status_code == 403, (target, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == "forbidden_path"
        # The message names the folder's role; it echoes what the client sent, never the server's absolute paths.
        leaked = error["message"].replace(f"'{target}'", "")
        for root in (guarded.data_dir, guarded.model_dir, guarded.data_dir.parent):
            assert str(root) not in leaked, error["message"]
        assert_intact(guarded, world)


@pytest.mark.parametrize("field", FIELDS)
def test_overwrite_never_replaces_a_folder_the_service_did_not_write(guarded, world, field):
    route, body, name, _ = bodies(world)[field]
    target = "victim.tar.gz" if field == "export archive" else "victim"
    payload = {**body, name: target}
    r = world["client"].post(route, json=payload)
    assert r.status_code == 409, r.text
    assert "did not write" in r.json()["error"]["message"]
    assert_intact(guarded, world)


def test_an_output_of_another_kind_is_not_replaced(guarded, world):
    """A trained model is not overwritten by an export, nor an export by a training run."""
    trained = guarded.model_dir / "outputs" / "mine"
    trained.mkdir(parents=True)
    (trained / "adapter_model.safetensors").write_text("weights")
    write_marker(trained, "train", "t1")
    client = world["client"]
    r = client.post("/api/export/onnx", json={"output_path": "outputs/mine", "overwrite": True})
    assert r.status_code == 409 and "a train output" in r.json()["error"]["message"]
    exported = guarded.model_dir / "exports" / "e"
    exported.mkdir(parents=True)
    (exported / "model.onnx").write_text("graph")
    write_marker(exported, "export", "e1")
    r = client.post(
        "/api/train/start",
        json={"strategy": "lora", "dataset_path": "uploads/keep.jsonl", "output_dir": "exports/e", "overwrite": True},
    )
    assert r.status_code == 409 and "an export output" in r.json()["error"]["message"]
    assert (trained / "adapter_model.safetensors").read_text() == "weights"
    assert (exported / "model.onnx").read_text() == "graph"
    assert_intact(guarded, world)


def test_process_replaces_its_own_output_only(guarded, world):
    client = world["client"]
    body = {"input_file": "uploads/keep.jsonl", "output_dir": "splits"}
    assert client.post("/api/data/process", json=body).status_code == 200
    assert read_marker(guarded.data_dir / "splits")["kind"] == "process"
    assert client.post("/api/data/process", json=body).status_code == 409  # exists, no overwrite
    assert client.post("/api/data/process", json={**body, "overwrite": True}).status_code == 200
    assert_intact(guarded, world)


def test_publish_replaces_only_a_marked_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    staging = fresh_dir(out)
    (staging / "a.txt").write_text("1")
    publish(staging, out, "export", "task-1")
    assert read_marker(out) == {**read_marker(out), "kind": "export", "task_id": "task-1"}
    # mkdtemp makes 0700 folders: a published output has the mode a plain mkdir gives.
    assert stat.S_IMODE(out.stat().st_mode) == default_dir_mode()
    again = fresh_dir(out)
    (again / "b.txt").write_text("2")
    publish(again, out, "export", "task-2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    other = fresh_dir(out)
    with pytest.raises(ConflictError, match="an export output"):
        publish(other, out, "train", "task-3")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "IMPORTANT.txt").write_text(IMPORTANT)
    with pytest.raises(ConflictError, match="did not write"):
        publish(fresh_dir(foreign), foreign, "export", "task-4")
    assert (foreign / "IMPORTANT.txt").read_text() == IMPORTANT
    # A file output (an archive) keeps its marker beside it.
    staged = tmp_path / ".x.partial"
    staged.write_text("tar")
    publish(staged, tmp_path / "x.tar.gz", "export", "task-5")
    assert read_marker(tmp_path / "x.tar.gz")["task_id"] == "task-5"
    user_archive = tmp_path / "user.tar.gz"
    user_archive.write_text(IMPORTANT)
    staged.write_text("tar")
    with pytest.raises(ConflictError):
        publish(staged, user_archive, "export", "task-6")
    assert user_archive.read_text() == IMPORTANT


def test_archive_export_overwrites_its_own_archive_with_normal_permissions(guarded, world):
    client = world["client"]
    body = {"model": str(world["adapter"]), "output_path": "exports/a.tar.gz", "wait": True}
    first = client.post("/api/export/archive", json=body).json()
    assert first["status"] == "succeeded", first
    archive = guarded.model_dir / "exports" / "a.tar.gz"
    assert read_marker(archive)["task_id"] == first["task_id"]
    assert client.post("/api/export/archive", json=body).status_code == 409
    second = client.post("/api/export/archive", json={**body, "overwrite": True}).json()
    assert second["status"] == "succeeded", second
    assert read_marker(archive)["task_id"] == second["task_id"]
    assert stat.S_IMODE(archive.stat().st_mode) == default_dir_mode() & 0o666
    assert (guarded.data_dir / "uploads" / "keep.jsonl").is_file()


# -- item 2: paths read from files a client controls --------------------------------------------------------


def upload_adapter(client: TestClient, base: str) -> None:
    """Upload an adapter_config.json naming `base`, plus weights, as the issue's reproduction does."""
    config = {"base_model_name_or_path": base, "peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    for name, content in (("adapter_config.json", json.dumps(config)), ("adapter_model.safetensors", "x")):
        r = client.post("/api/data/upload", files={"file": (name, content.encode())}, data={"overwrite": "true"})
        assert r.status_code == 201, r.text


def test_an_uploaded_adapter_pointing_outside_the_roots_is_403(guarded, world, tmp_path):
    client = world["client"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for base in (str(elsewhere), "/etc", "../../../../etc", str(guarded.data_dir.parent)):
        upload_adapter(client, base)
        model = str(guarded.data_dir / "uploads")
        calls = [
            ("/api/inference/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            ("/api/data/validate", {"file_path": "uploads/keep.jsonl", "model": model}),
            ("/api/export/merged", {"model": model}),
            ("/api/export/onnx", {"model": model}),
            ("/api/eval/evaluate", {"model": model, "dataset_path": "uploads/keep.jsonl"}),
            (
                "/api/train/start",
                {"strategy": "lora", "dataset_path": "uploads/keep.jsonl", "config": {"model_path": model}},
            ),
        ]
        for route, body in calls:
            r = client.post(route, json=body)
            assert r.status_code == 403, (base, route, r.status_code, r.text)
            message = r.json()["error"]["message"]
            assert "base_model_name_or_path" in message and str(elsewhere) not in message
            assert str(guarded.data_dir) not in message
    # The same adapter naming the base store (inside the model dir, even through its symlink) is accepted.
    upload_adapter(client, str(guarded.model_dir / "base" / "tiny-llama"))
    r = client.post(
        "/api/data/validate", json={"file_path": "uploads/keep.jsonl", "model": str(guarded.data_dir / "uploads")}
    )
    assert r.status_code == 200, r.text
    assert_intact(guarded, world)


def test_the_worker_checks_the_adapter_again(guarded, world):
    """An adapter config rewritten after the request was checked cannot make the worker load an outside model."""
    client = world["client"]
    upload_adapter(client, str(guarded.model_dir / "base" / "tiny-llama"))
    uploads = guarded.data_dir / "uploads"
    request = {
        "format": "archive",
        "export": {},
        "resolved": {"model_path": str(uploads), "output_path": str(guarded.model_dir / "u.tar.gz")},
    }
    upload_adapter(client, "/etc")  # rewritten while the task waited in the queue
    store = client.app.state.store
    task = store.create(TaskKind.export, request)
    with pytest.raises(ForbiddenPathError, match="base_model_name_or_path"):
        run_export(guarded, store, task.id, request)
    assert not (guarded.model_dir / "u.tar.gz").exists()


def test_a_saved_run_state_naming_an_outside_base_is_403(guarded, world, tmp_path):
    client = world["client"]
    state = guarded.model_dir / "runs" / "r1" / "s1"
    state.mkdir(parents=True)
    (state / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path), "r": 4}))
    r = client.post("/v1/runs", json={"from_state": "runs/r1/s1"})
    assert r.status_code == 403, r.text
    assert str(tmp_path) not in r.json()["error"]["message"]
    assert_intact(guarded, world)


def test_a_tokenizer_config_naming_an_outside_file_is_403(guarded, world, tmp_path):
    client = world["client"]
    folder = guarded.data_dir / "mymodel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_file": str(tmp_path / "outside.json")}))
    r = client.post("/api/data/validate", json={"file_path": "uploads/keep.jsonl", "model": str(folder)})
    assert r.status_code == 403, r.text
    assert "tokenizer_file" in r.json()["error"]["message"] and str(tmp_path) not in r.json()["error"]["message"]


def test_an_upload_cannot_forge_an_output_marker(guarded, world):
    """A client can't mark uploads/ as an export output (and so have an export replace it)."""
    client = world["client"]
    forged = json.dumps({"kind": "export", "task_id": "x"}).encode()
    for name in (OUTPUT_MARKER, f".keep.tar.gz{OUTPUT_MARKER}", ".hidden"):
        r = client.post("/api/data/upload", files={"file": (name, forged)})
        assert r.status_code == 422, r.text
    r = client.post("/api/export/onnx", json={"output_path": str(guarded.data_dir / "uploads"), "overwrite": True})
    assert r.status_code == 403, r.text  # uploads/ is never an output at all (issue 26): no marker could change that
    assert_intact(guarded, world)


def test_a_run_state_saved_before_markers_is_still_replaceable_by_its_run_only(tmp_path):
    from service.runs import RUN_STATE_KIND, adopt_legacy_state

    state = tmp_path / "autosave"
    state.mkdir()
    (state / "run_state.json").write_text(json.dumps({"run_id": "r1", "step": 3}))
    adopt_legacy_state(state, "r2")  # another run's folder stays unmarked, so it is never replaced
    assert read_marker(state) is None
    with pytest.raises(ConflictError):
        publish(fresh_dir(state), state, RUN_STATE_KIND, "r2")
    adopt_legacy_state(state, "r1")
    assert read_marker(state)["kind"] == RUN_STATE_KIND
    publish(fresh_dir(state), state, RUN_STATE_KIND, "r1")
    assert read_marker(state)["task_id"] == "r1"


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "[1, 2]", "{not json"])
def test_an_unreadable_uploaded_adapter_config_is_a_4xx(guarded, world, content):
    """A client's adapter_config.json nested too deep to parse, not an object, or malformed: a clear 4xx."""
    client = world["client"]
    for name, body in (("adapter_config.json", content), ("adapter_model.safetensors", "x")):
        r = client.post("/api/data/upload", files={"file": (name, body.encode())}, data={"overwrite": "true"})
        assert r.status_code == 201, r.text
    model = str(guarded.data_dir / "uploads")
    for route, body in (
        ("/api/inference/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/data/validate", {"file_path": "uploads/keep.jsonl", "model": model}),
        ("/api/export/merged", {"model": model}),
    ):
        r = client.post(route, json=body)
        assert r.status_code == 422, (route, r.status_code, r.text[:300])
        assert "adapter_config.json" in r.json()["error"]["message"]
    assert_intact(guarded, world)
