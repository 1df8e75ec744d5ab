"""Low-level training API: runs, ordered jobs, sampling with current weights, save/load, limits, crashes."""

import os
import signal
import time

import pytest
import torch
from fastapi.testclient import TestClient
from pg import both_backends
from safetensors.torch import load_file

from main import create_app
from service.jobs import pid_alive

pytestmark = both_backends  # every test here runs on SQLite and on PostgreSQL (test/pg.py)

PROMPT = [11, 220, 3056, 1092, 5078]
TARGET = [803, 4127, 2954, 611, 9123, 77]
# One fixed sequence: after the prompt, the run must learn to continue with TARGET.
SEQ = PROMPT + TARGET
EXAMPLE = {"input_ids": SEQ[:-1], "target_ids": SEQ[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(TARGET)}


def _run(client, **body) -> str:
    r = client.post("/v1/runs", json={"lora": {"r": 8, "alpha": 16}, "seed": 1, **body})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _call(client, run_id: str, primitive: str, body: dict) -> dict:
    """Submit a primitive and wait for its job; return the finished job."""
    r = client.post(f"/v1/runs/{run_id}/{primitive}", json=body)
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", params={"wait": True, "timeout": 120}).json()
    assert job["status"] in {"completed", "failed"}, job
    return job


def _ok(client, run_id: str, primitive: str, body: dict) -> dict:
    job = _call(client, run_id, primitive, body)
    assert job["status"] == "completed", job["error"]
    return job["result"]


def _wait_status(client, run_id: str, statuses: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.2)
    pytest.fail(f"run {run_id} never reached {statuses}: {run}")


@pytest.fixture
def runs_client(settings):
    """A client whose settings allow two live runs."""
    with TestClient(
        create_app(settings.model_copy(update={"runs": settings.runs.model_copy(update={"max_runs": 2})}))
    ) as c:
        yield c


def test_training_lowers_the_loss_and_sample_uses_current_weights(runs_client, settings):
    from service.models import load_tokenizer

    client = runs_client
    run_id = _run(client)
    prompt_text = load_tokenizer(settings.base_model_path()).decode(PROMPT)
    sample_body = {"prompts": [prompt_text], "max_tokens": 3, "temperature": 0}
    before = _ok(client, run_id, "sample", sample_body)["results"][0]["samples"][0]
    losses = []
    for _ in range(15):
        # Pipelined: both jobs are queued before either runs, and execute in order.
        fb = client.post(f"/v1/runs/{run_id}/forward_backward", json={"examples": [EXAMPLE], "loss": "cross_entropy"})
        step = client.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2})
        assert fb.status_code == step.status_code == 202
        fb_job = client.get(f"/v1/jobs/{fb.json()['job_id']}", params={"wait": True}).json()
        step_job = client.get(f"/v1/jobs/{step.json()['job_id']}", params={"wait": True}).json()
        assert fb_job["status"] == step_job["status"] == "completed"
        assert fb_job["result"]["num_tokens"] == len(TARGET)
        losses.append(fb_job["result"]["loss"])
    assert losses[-1] < losses[0] * 0.5, losses
    assert step_job["result"]["step"] == 15
    after = _ok(client, run_id, "sample", sample_body)["results"][0]["samples"][0]
    # The run samples with its updated weights: the learned continuation now has a far higher probability.
    assert after["tokens"] == TARGET[:3]
    assert before["tokens"] != after["tokens"]
    assert sum(after["logprobs"]) > sum(before["logprobs"])
    many = _ok(client, run_id, "sample", {**sample_body, "num_samples": 3, "temperature": 1.0, "seed": 4})
    assert len(many["results"][0]["samples"]) == 3
    again = _ok(client, run_id, "sample", {**sample_body, "num_samples": 3, "temperature": 1.0, "seed": 4})
    assert again["results"] == many["results"]
    chat = _ok(client, run_id, "sample", {"messages": [[{"role": "user", "content": "hi"}]], "max_tokens": 2})
    assert chat["results"][0]["prompt_tokens"] > 3
    assert client.get(f"/v1/runs/{run_id}").json()["steps"] == 15


def test_save_and_load_restore_identical_weights_and_optimizer(runs_client, settings):
    client = runs_client
    run_a = _run(client)
    for _ in range(3):
        _ok(client, run_a, "forward_backward", {"examples": [EXAMPLE]})
        _ok(client, run_a, "optim_step", {"learning_rate": 1e-2})
    saved = _ok(client, run_a, "save_state", {"name": "s1"})
    assert saved["path"] == f"runs/{run_a}/s1" and saved["step"] == 3
    assert client.post(f"/v1/runs/{run_a}/save_state", json={"name": "s1"}).status_code == 409
    names = [c["name"] for c in client.get(f"/v1/runs/{run_a}/checkpoints").json()["items"]]
    assert names == ["s1"]

    run_b = _run(client, from_state=saved["path"], with_optimizer=True)
    assert client.get(f"/v1/runs/{run_b}").json()["lora"]["r"] == 8
    _ok(client, run_b, "save_state", {"name": "copy"})
    s1, copy = settings.model_dir / "runs" / run_a / "s1", settings.model_dir / "runs" / run_b / "copy"
    for name in ("adapter_model.safetensors",):
        a, b = load_file(s1 / name), load_file(copy / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = torch.load(s1 / "optimizer.pt"), torch.load(copy / "optimizer.pt")
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for k, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][k][field]), (k, field)
    # Same weights and optimizer state: the same next step gives the same losses on both runs.
    for run_id in (run_a, run_b):
        _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})
        _ok(client, run_id, "optim_step", {"learning_rate": 1e-2})
    loss_a = _ok(client, run_a, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    loss_b = _ok(client, run_b, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    assert loss_a == pytest.approx(loss_b, abs=1e-6)

    # load_state into a live run replaces its adapter: its loss becomes the saved run's.
    client.delete(f"/v1/runs/{run_b}")
    run_c = _run(client, seed=9)
    fresh = _ok(client, run_c, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    loaded = _ok(client, run_c, "load_state", {"path": saved["path"], "with_optimizer": True})
    assert loaded["step"] == 3
    _ok(client, run_a, "load_state", {"path": saved["path"], "with_optimizer": True})
    restored_a = _ok(client, run_a, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    restored_c = _ok(client, run_c, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    assert restored_c == pytest.approx(restored_a, abs=1e-6) and restored_c != pytest.approx(fresh, abs=1e-3)

    # A saved state is a model for chat and export.
    r = client.post(
        "/api/inference/chat", json={"model": saved["path"], "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200, r.text
    archive = client.post("/api/export/archive", json={"model": saved["path"], "wait": True}).json()
    assert archive["status"] == "succeeded"


def test_bad_input_and_limits(runs_client):
    client = runs_client
    run_id = _run(client)
    fb = f"/v1/runs/{run_id}/forward_backward"
    out_of_vocab = client.post(fb, json={"examples": [{"input_ids": [1, 10**6], "target_ids": [2, 3]}]})
    assert out_of_vocab.status_code == 422 and "vocabulary" in out_of_vocab.json()["error"]["message"]
    assert client.post(fb, json={"examples": [{"input_ids": [1, -1], "target_ids": [2, 3]}]}).status_code == 422
    mismatch = client.post(fb, json={"examples": [{"input_ids": [1, 2, 3], "target_ids": [2, 3]}]})
    assert mismatch.status_code == 422 and "differ in length" in mismatch.json()["error"]["message"]
    assert (
        client.post(fb, json={"examples": [{"messages": [{"role": "user", "content": "no answer"}]}]}).status_code
        == 422
    )
    assert client.post(fb, json={"examples": [EXAMPLE], "loss": "ppo"}).status_code == 422
    no_grads = client.post(f"/v1/runs/{run_id}/optim_step", json={})
    assert no_grads.status_code == 409 and "forward_backward" in no_grads.json()["error"]["message"]
    sample = f"/v1/runs/{run_id}/sample"
    assert (
        client.post(sample, json={"prompts": ["a"], "messages": [[{"role": "user", "content": "b"}]]}).status_code
        == 422
    )
    assert client.post(f"/v1/runs/{run_id}/save_state", json={"name": "../escape"}).status_code == 422
    assert client.post(f"/v1/runs/{run_id}/load_state", json={"path": "/etc"}).status_code == 403
    assert client.post(f"/v1/runs/{run_id}/load_state", json={"path": "runs/none"}).status_code == 404
    zero = _call(
        client, run_id, "forward_backward", {"examples": [{"input_ids": [1], "target_ids": [2], "weights": [0]}]}
    )
    assert zero["status"] == "failed" and "zero" in zero["error"]
    assert _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})["loss"] > 0  # the run carries on

    second = _run(client)
    too_many = client.post("/v1/runs", json={})
    assert too_many.status_code == 429 and "max_runs" in too_many.json()["error"]["message"]
    assert client.delete(f"/v1/runs/{second}").json()["status"] == "deleted"
    for call in ("forward_backward", "sample", "optim_step"):
        r = client.post(f"/v1/runs/{second}/{call}", json={"examples": [EXAMPLE], "prompts": ["x"]})
        assert r.status_code in (409, 422)
    assert client.post(f"/v1/runs/{second}/sample", json={"prompts": ["x"]}).status_code == 409
    assert client.delete(f"/v1/runs/{second}").status_code == 409
    assert client.get("/v1/runs/" + "0" * 32).status_code == 404
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.post("/v1/runs", json={"base_model": "no-such-model"}).status_code == 404
    assert second in [r["id"] for r in client.get("/v1/runs").json()["items"]]


def test_worker_crash_fails_the_run_and_frees_its_slot(runs_client):
    client = runs_client
    run_id = _run(client)
    run = _wait_status(client, run_id, {"ready"})
    pending = client.post(f"/v1/runs/{run_id}/sample", json={"prompts": ["x"], "max_tokens": 1})
    pid = client.app.state.run_service.store.get_run(run_id).pid
    os.kill(pid, signal.SIGKILL)
    run = _wait_status(client, run_id, {"failed"}, timeout=30)
    assert "SIGKILL" in run["error"]
    job = client.get(f"/v1/jobs/{pending.json()['job_id']}").json()
    assert job["status"] in {"failed", "completed"}
    assert client.post(f"/v1/runs/{run_id}/sample", json={"prompts": ["x"]}).status_code == 409
    _run(client)  # the slot is free again
    _run(client)
    assert not pid_alive(pid)


def test_idle_run_pauses_with_its_state_and_resumes(settings):
    idle = settings.model_copy(update={"runs": settings.runs.model_copy(update={"idle_ttl_seconds": 1.0})})
    with TestClient(create_app(idle)) as client:
        run_id = _run(client)
        _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})
        _ok(client, run_id, "optim_step", {"learning_rate": 1e-2})
        loss = _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})["loss"]
        run = _wait_status(client, run_id, {"paused"}, timeout=30)
        assert run["steps"] == 1
        assert "autosave" in [c["name"] for c in client.get(f"/v1/runs/{run_id}/checkpoints").json()["items"]]
        # The next call restarts the worker from the saved state.
        again = _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})["loss"]
        assert again == pytest.approx(loss, abs=1e-6)


def test_runs_survive_a_server_restart(settings):
    with TestClient(create_app(settings)) as client:
        run_id = _run(client)
        _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})
        _ok(client, run_id, "optim_step", {"learning_rate": 1e-2})
        loss = _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})["loss"]
    # Shutdown stopped the worker, which saved the run's state and paused it.
    with TestClient(create_app(settings)) as client:
        run = client.get(f"/v1/runs/{run_id}").json()
        assert run["status"] == "paused" and run["steps"] == 1
        assert _ok(client, run_id, "forward_backward", {"examples": [EXAMPLE]})["loss"] == pytest.approx(loss, abs=1e-6)
