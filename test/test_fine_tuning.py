"""The OpenAI fine-tuning API through the real `openai` client against a live server on the tiny model."""

import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import PROJECT_ROOT, SAMPLE, TINY_NAME, make_settings, start_server, stop_server
from entity.task import TaskKind, TaskStatus
from main import create_app

KEY = "sk-test-fine-tuning"
PREFS = PROJECT_ROOT / "test" / "data" / "preference_sample.jsonl"
CHAT_RECORDS = [{"messages": r["conversations"]} for r in json.loads(SAMPLE.read_text())]


def jsonl(records: list[Any]) -> bytes:
    """Records as JSONL bytes (strings are written as raw lines)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def server(tiny_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One live server (one job slot, an API key) for the module."""
    workdir = tmp_path_factory.mktemp("ft_server")
    extra = {"auth": {"api_keys": [KEY]}, "jobs": {"poll_interval": 0.2, "max_concurrent_jobs": 1}}
    extra["train"] = {"max_length": 256}
    url, proc = start_server(workdir, tiny_model_root, extra)
    yield url
    stop_server(proc)


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    """The official client, pointed at the server with its API key."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def upload(oai: openai.OpenAI, records: list[Any], name: str = "train.jsonl") -> str:
    """Upload records for fine-tuning; the file id."""
    return oai.files.create(file=(name, io.BytesIO(jsonl(records))), purpose="fine-tune").id


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 240.0) -> Any:
    """Call fetch until done(result) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fetch()
        if done(result):
            return result
        time.sleep(0.3)
    pytest.fail(f"timed out; last: {result}")


def finished(oai: openai.OpenAI, job_id: str) -> Any:
    """Wait until a job has finished."""
    return poll(
        lambda: oai.fine_tuning.jobs.retrieve(job_id), lambda j: j.status in ("succeeded", "failed", "cancelled")
    )


def rising(values: list[float]) -> bool:
    """Whether the last third of a series averages above its first third."""
    third = max(1, len(values) // 3)
    return sum(values[-third:]) / third > sum(values[:third]) / third


def test_files_upload_list_content_delete(oai):
    ids = [upload(oai, CHAT_RECORDS[:3], f"part{i}.jsonl") for i in range(3)]
    got = oai.files.retrieve(ids[0])
    assert (got.object, got.purpose, got.status, got.filename) == ("file", "fine-tune", "processed", "part0.jsonl")
    assert got.bytes == len(jsonl(CHAT_RECORDS[:3]))
    assert oai.files.content(ids[1]).read() == jsonl(CHAT_RECORDS[:3])
    page = oai.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    listed = [f.id for f in oai.files.list(limit=2)]  # the SDK follows the cursor
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    assert [f.id for f in oai.files.list(order="asc")] == list(reversed([f.id for f in oai.files.list()]))
    assert oai.files.delete(ids[2]).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(ids[2])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oai.files.create(file=("x.jsonl", io.BytesIO(jsonl(CHAT_RECORDS[:1]))), purpose="batch")


def test_bad_file_is_refused_with_its_lines(oai):
    before = {f.id for f in oai.files.list()}
    records = [CHAT_RECORDS[0], "{oops", {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        upload(oai, records, "bad.jsonl")
    assert err.value.status_code == 400
    assert err.value.param == "file" and err.value.code == "invalid_file"
    assert "line 2: bad JSON" in err.value.message and "line 3: no assistant turn" in err.value.message
    assert {f.id for f in oai.files.list()} == before


def test_eight_concurrent_uploads_each_get_a_file(oai):
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: upload(oai, CHAT_RECORDS[i : i + 2], f"c{i}.jsonl"), range(8)))
    assert len(set(ids)) == 8
    listed = {f.id for f in oai.files.list()}
    assert set(ids) <= listed
    assert [oai.files.content(i).read() for i in ids] == [jsonl(CHAT_RECORDS[i : i + 2]) for i in range(8)]


def test_wrong_key_is_refused(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.fine_tuning.jobs.list()


def test_supervised_job_end_to_end(oai, server):
    train = upload(oai, CHAT_RECORDS[:16])
    valid = upload(oai, CHAT_RECORDS[16:20], "valid.jsonl")
    job = oai.fine_tuning.jobs.create(
        model=TINY_NAME,
        training_file=train,
        validation_file=valid,
        suffix="demo",
        seed=7,
        metadata={"team": "search"},
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5},
    )
    assert job.status in ("queued", "running") and job.id.startswith("ftjob-") and job.fine_tuned_model is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (1, 4)
    job = finished(oai, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{TINY_NAME}:demo:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.seed == 7
    assert job.metadata == {"team": "search"} and job.estimated_finish is None

    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=5))  # paged by the SDK, newest first
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)
    assert events[0].message == "succeeded" and all(e.level in ("info", "warn", "error") for e in events)

    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4]
    assert checkpoints[0].metrics.train_loss is not None and checkpoints[0].metrics.valid_loss is not None

    results = oai.files.content(job.result_files[0]).text.splitlines()
    assert results[0].startswith("step,train_loss,train_accuracy,valid_loss") and len(results) == 5

    for model in (job.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint):
        reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content is not None
    listed = {m.id: m for m in oai.models.list()}
    assert listed[job.fine_tuned_model].owned_by == "user"
    assert listed[job.fine_tuned_model].model_extra["parent"] == TINY_NAME
    assert listed[TINY_NAME].owned_by == "win-train"
    assert oai.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
    assert [j.id for j in oai.fine_tuning.jobs.list(metadata={"team": "search"})] == [job.id]

    # the name works on /api routes that take a model, and training continues from it
    checked = httpx.post(
        f"{server}/api/data/validate",
        json={"file_path": f"files/{train}.jsonl", "model": job.fine_tuned_model},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert checked.status_code == 200 and checked.json()["valid"], checked.text
    again = oai.fine_tuning.jobs.create(
        model=job.fine_tuned_model, training_file=train, hyperparameters={"n_epochs": 1, "batch_size": 8}
    )
    again = finished(oai, again.id)
    assert again.status == "succeeded" and again.fine_tuned_model.startswith(f"ft:{TINY_NAME}::")

    with pytest.raises(openai.PermissionDeniedError):
        oai.models.delete(TINY_NAME)
    assert oai.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def test_dpo_job_raises_the_reward_margin(oai):
    prefs = oai.files.create(file=PREFS.open("rb"), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as err:
        oai.fine_tuning.jobs.create(model=TINY_NAME, training_file=prefs)  # supervised on preference data
    assert err.value.param == "training_file" and "method dpo" in err.value.message
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 100, "beta": 0.1}
    job = oai.fine_tuning.jobs.create(
        model=TINY_NAME, training_file=prefs, method={"type": "dpo", "dpo": {"hyperparameters": hp}}
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    job = finished(oai, job.id)
    assert job.status == "succeeded", job.error
    steps = [e.data for e in oai.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"][::-1]
    margins = [s["rewards/margins"] for s in steps]
    assert len(margins) == 8 and rising(margins), margins
    assert all("rewards/accuracies" in s for s in steps)
    reply = oai.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices


def test_pause_saves_a_checkpoint_and_resume_continues(oai):
    train = upload(oai, CHAT_RECORDS * 2)
    job = oai.fine_tuning.jobs.create(
        model=TINY_NAME, training_file=train, hyperparameters={"n_epochs": 1, "batch_size": 1}
    )

    def trained_steps() -> list[int]:
        events = oai.fine_tuning.jobs.list_events(job.id, limit=1000)
        return [e.data["step"] for e in events if e.type == "metrics"]

    poll(trained_steps, lambda steps: len(steps) >= 2)
    running = oai.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish >= running.created_at
    paused = oai.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    checkpoints = poll(lambda: oai.fine_tuning.jobs.checkpoints.list(job.id).data, lambda c: len(c) == 1)
    at = checkpoints[0].step_number
    assert 2 <= at < 80
    time.sleep(1.5)  # a paused job holds no process: nothing more is trained
    assert max(trained_steps()) == at
    assert oai.fine_tuning.jobs.retrieve(job.id).status == "paused"

    resumed = poll(lambda: _try_resume(oai, job.id), lambda j: j is not None, timeout=60)
    assert resumed.status == "queued"
    job = finished(oai, job.id)
    assert job.status == "succeeded", job.error
    steps = trained_steps()[::-1]
    assert steps == list(range(1, 81))  # each step once: the second run started after the checkpoint
    messages = [e.message for e in oai.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert f"resuming from checkpoint-{at}" in messages


def _try_resume(oai: openai.OpenAI, job_id: str) -> Any:
    """Resume, or None while the paused worker is still saving."""
    try:
        return oai.fine_tuning.jobs.resume(job_id)
    except openai.ConflictError:
        return None


def test_eight_concurrent_jobs_queue_behind_one_slot_and_cancel(oai):
    train = upload(oai, CHAT_RECORDS)
    create = lambda i: oai.fine_tuning.jobs.create(  # noqa: E731
        model=TINY_NAME, training_file=train, suffix=f"c{i}", hyperparameters={"n_epochs": 3, "batch_size": 1}
    )
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(create, range(8)))
    ids = [j.id for j in jobs]
    assert len(set(ids)) == 8
    for _ in range(5):
        statuses = [oai.fine_tuning.jobs.retrieve(i).status for i in ids]
        assert statuses.count("running") <= 1, statuses
        time.sleep(0.2)

    first = oai.fine_tuning.jobs.list(limit=3)
    assert len(first.data) == 3 and first.has_more
    second = oai.fine_tuning.jobs.list(limit=3, after=first.data[-1].id)
    assert not {j.id for j in first.data} & {j.id for j in second.data}
    everything = [j.id for j in oai.fine_tuning.jobs.list(limit=3)]
    assert set(ids) <= set(everything) and len(everything) == len(set(everything))

    queued = next(i for i in reversed(ids) if oai.fine_tuning.jobs.retrieve(i).status == "queued")
    assert oai.fine_tuning.jobs.pause(queued).status == "paused"
    with ThreadPoolExecutor(8) as pool:
        resumed = list(pool.map(lambda _: _try_resume(oai, queued), range(8)))
    assert sum(r is not None for r in resumed) == 1  # one resume wins; the others get 409
    assert oai.fine_tuning.jobs.retrieve(queued).status in ("queued", "running")
    with ThreadPoolExecutor(8) as pool:
        cancelled = list(pool.map(oai.fine_tuning.jobs.cancel, ids))
    assert {j.status for j in cancelled} == {"cancelled"}
    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.cancel(ids[0])
    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.resume(ids[0])


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, openai.BadRequestError, "integrations"),
        ({"method": {"type": "reinforcement"}}, openai.BadRequestError, "reinforcement"),
        ({"training_file": "file-missing"}, openai.BadRequestError, "training_file"),
        ({"model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
        ({"model": "ft:tiny-llama:x:0123456789abcdef0123456789abcdef"}, openai.NotFoundError, "was not found"),
        ({"hyperparameters": {"n_epochs": 0}}, openai.UnprocessableEntityError, "n_epochs"),
        ({"suffix": "a:b"}, openai.UnprocessableEntityError, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, openai.UnprocessableEntityError, "16"),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            openai.BadRequestError,
            "not both",
        ),
    ],
)
def test_bad_job_requests(oai, body, error, text):
    train = upload(oai, CHAT_RECORDS[:2])
    with pytest.raises(error) as err:
        oai.fine_tuning.jobs.create(**{"model": TINY_NAME, "training_file": train, **body})
    assert text in err.value.message
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve("ftjob-nope")


def test_failed_job_carries_its_error(client):
    """A failed train task shows as a failed job with error.code/message (store-level: no need to crash a run)."""
    store = client.app.state.store
    meta = {"base": TINY_NAME, "model": TINY_NAME, "suffix": None, "training_file": "file-x", "seed": 1}
    meta.update(method="supervised", hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1})
    task = store.create(TaskKind.train, {"openai": meta, "resolved": {}})
    store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
    store.move(task.id, TaskStatus.failed, (TaskStatus.running,), error="RuntimeError: out of memory\n  traceback...")
    job = client.get(f"/v1/fine_tuning/jobs/ftjob-{task.id}").json()
    assert job["status"] == "failed" and job["fine_tuned_model"] is None and job["result_files"] == []
    assert job["error"] == {"code": "training_failed", "message": "RuntimeError: out of memory", "param": None}
    assert job["finished_at"] is not None
    r = client.post(f"/v1/fine_tuning/jobs/ftjob-{task.id}/pause")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_upload_limit_holds_for_eight_at_once(tmp_path, tiny_model_root):
    """Eight concurrent uploads over data.max_upload_mb: each gets 413 and nothing is stored."""
    settings = make_settings(tmp_path, tiny_model_root)
    settings = settings.model_copy(update={"data": settings.data.model_copy(update={"max_upload_mb": 1})})
    big = jsonl(CHAT_RECORDS * 200)
    assert len(big) > 1024 * 1024
    with TestClient(create_app(settings)) as client:

        def post(i: int) -> Any:
            return client.post("/v1/files", files={"file": (f"big{i}.jsonl", big)}, data={"purpose": "fine-tune"})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        assert [a.status_code for a in answers] == [413] * 8
        assert all("1 MB limit (data.max_upload_mb)" in a.json()["error"]["message"] for a in answers)
        assert all(a.json()["error"]["param"] == "file" for a in answers)
        assert client.get("/v1/files").json()["data"] == []
    assert not any((settings.data_dir / "files").iterdir())
