"""The SDK and the CLI against a real server (API keys on), plus retries against a failing HTTP peer."""

import http.server
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SAMPLE, free_port, start_server, stop_server
from sdk import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    TuningClient,
)
from util.settings import PROJECT_ROOT

KEY = "sdk-test-key"
FAST = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "lora_r": 4, "save_steps": 100}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root) -> Iterator[str]:
    """A real server with an API key, the sample uploaded and split."""
    url, proc = start_server(tmp_path_factory.mktemp("sdk_server"), tiny_model_root, {"auth": {"api_keys": [KEY]}})
    with TuningClient(base_url=url, api_key=KEY) as c:
        c.data.upload(SAMPLE)
        c.data.process("uploads/train_sample.json", "sample", split=(0.8, 0.1, 0.1), seed=1)
    yield url
    stop_server(proc)


@pytest.fixture
def sdk(server) -> Iterator[TuningClient]:
    with TuningClient(base_url=server, api_key=KEY, max_retries=0) as c:
        yield c


def cli(server: str | None, *args: str, key: str = KEY) -> subprocess.CompletedProcess:
    """Run `python -m sdk.cli` like the `wintrain` script."""
    base = ["--base-url", server] if server else []
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *base, "--api-key", key, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_job_is_created_waited_listed_and_logged(sdk):
    seen = []
    job = sdk.tunings.create("sample/train.jsonl", strategy="lora", hyperparameters=FAST)
    assert job.kind == "train" and job.status in {"queued", "running"}
    final = sdk.tunings.wait(job.id, on_progress=seen.append, poll_interval=0.2)
    assert final.is_successful and final.is_terminal and not final.is_failed
    assert final.current_step == final.total_steps == 3
    assert final.duration and final.duration > 0
    assert final.metrics["train_loss"] > 0
    assert final.fine_tuned_model == job.id
    assert seen[-1].status == "succeeded" and len(seen) >= 2
    assert job.id in [j.id for j in sdk.tunings.list(status="succeeded")]
    events = list(sdk.tunings.stream_logs(job.id))
    assert events[-1]["event"] == "end" and events[-1]["status"] == "succeeded"
    assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "running", "succeeded"]
    assert len([e for e in events if e["event"] == "metrics"]) == 3
    # The trained adapter is a model to chat with, by job id.
    answer = sdk.inference.chat("Hello", model=final.fine_tuned_model, max_tokens=4, temperature=0)
    assert answer["usage"]["completion_tokens"] >= 1


def test_cancel_and_wait_raising(sdk):
    job = sdk.tunings.create("sample/train.jsonl", hyperparameters={**FAST, "steps": 5000})
    cancelled = sdk.tunings.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(JobFailedError) as err:
        sdk.tunings.wait(job.id, show_progress=False)
    assert err.value.job.status == "cancelled"
    assert sdk.tunings.wait(job.id, show_progress=False, raise_on_failure=False).is_failed
    with pytest.raises(ConflictError):
        sdk.tunings.cancel(job.id)


def test_inference_eval_and_export_through_the_sdk(sdk, tmp_path):
    pieces = list(sdk.inference.stream("Say hi", max_tokens=5, temperature=0))
    assert pieces[-1]["type"] == "done" and any(p["type"] == "delta" for p in pieces)
    batch = sdk.inference.batch([{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}, {"messages": []}])
    assert batch["results"][0]["result"] and batch["results"][1]["error"]["status_code"] == 422
    evaluation = sdk.eval.evaluate("sample/val.jsonl", metrics=["loss"])
    assert evaluation.is_successful and evaluation.metrics["metrics"]["loss"] > 0
    archive = sdk.export.archive(output_path="exports/sdk-base.tar.gz")
    assert archive.is_successful
    saved = sdk.export.download(archive.id, tmp_path)
    assert saved.name == "sdk-base.tar.gz" and tarfile.is_tarfile(saved)


def test_each_error_class_matches_its_status(server, sdk):
    with TuningClient(base_url=server, api_key="wrong") as bad, pytest.raises(AuthenticationError) as err:
        bad.tunings.list()
    assert err.value.status_code == 401
    with TuningClient(base_url=server) as anonymous, pytest.raises(AuthenticationError):
        anonymous.health() and anonymous.tunings.list()
    with pytest.raises(NotFoundError):
        sdk.tunings.get("0" * 32)
    with pytest.raises(InvalidRequestError) as err:
        sdk.tunings.create("sample/train.jsonl", strategy="nope")
    assert err.value.status_code == 422 and "nope" in err.value.message
    with pytest.raises(PermissionDeniedError):
        sdk.data.validate("/etc/passwd")
    with TuningClient(base_url=f"http://127.0.0.1:{free_port()}", max_retries=1, backoff=0.01) as down:
        with pytest.raises(APIConnectionError):
            down.health()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `fail` requests, then 200."""

    fail = 2
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        ok = type(self).calls > type(self).fail
        body = json.dumps({"status": "ok"} if ok else {"error": {"type": "unavailable", "message": "busy"}}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_idempotent_calls_retry_5xx_with_backoff():
    peer = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{peer.server_address[1]}"
    try:
        _Flaky.calls, _Flaky.fail = 0, 2
        with TuningClient(base_url=url, max_retries=2, backoff=0.01) as c:
            assert c.health() == {"status": "ok"}
        assert _Flaky.calls == 3
        _Flaky.calls, _Flaky.fail = 0, 5
        with TuningClient(base_url=url, max_retries=2, backoff=0.01) as c, pytest.raises(APIError) as err:
            c.health()
        assert err.value.status_code == 503 and _Flaky.calls == 3
        _Flaky.calls, _Flaky.fail = 0, 1
        with TuningClient(base_url=url, max_retries=2, backoff=0.01) as c, pytest.raises(APIError):
            c.inference.batch([])  # a POST is not retried on 5xx: it may have had an effect
        assert _Flaky.calls == 1
    finally:
        peer.shutdown()


# -- CLI ---------------------------------------------------------------------------------------------------


def test_cli_json_output_and_exit_codes(server):
    health = cli(server, "--json", "health")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "ok"

    started = cli(
        server,
        "--json",
        "train",
        "start",
        "sample/train.jsonl",
        "--strategy",
        "lora",
        "--set",
        "max_steps=2",
        "--set",
        "per_device_train_batch_size=2",
        "--set",
        'lora_config={"r": 4}',
        "--wait",
    )
    assert started.returncode == 0, started.stderr + started.stdout
    job = json.loads(started.stdout)
    assert job["status"] == "succeeded" and job["current_step"] == 2

    listed = cli(server, "--json", "train", "list")
    assert job["id"] in [j["id"] for j in json.loads(listed.stdout)]
    status = cli(server, "--json", "train", "status", job["id"])
    assert json.loads(status.stdout)["status"] == "succeeded"
    logs = cli(server, "--json", "train", "logs", job["id"], "--follow")
    lines = [json.loads(line) for line in logs.stdout.splitlines()]
    assert lines[-1]["event"] == "end"
    table = cli(server, "status")
    assert table.returncode == 0 and "recent jobs" in table.stdout
    chat = cli(server, "--json", "chat", "hello", "--max-tokens", "3", "--temperature", "0")
    assert json.loads(chat.stdout)["usage"]["completion_tokens"] >= 1

    failing = cli(
        server,
        "--json",
        "train",
        "start",
        "sample/train.jsonl",
        "--set",
        "max_steps=2",
        "--set",
        'lora_config={"target_modules": ["no_such_layer"]}',
        "--wait",
    )
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert json.loads(failing.stdout)["status"] == "failed"

    assert cli(server, "train", "status", "0" * 32).returncode == 2  # unknown id
    assert cli(server, "data", "process", "x", "--split", "0.5,0.5").returncode == 2
    assert cli(server, "train", "start", "sample/train.jsonl", "--set", "novalue").returncode == 2
    assert cli(server, "health", key="wrong").returncode == 0  # /health stays open
    assert cli(server, "train", "list", key="wrong").returncode == 2
    assert cli(f"http://127.0.0.1:{free_port()}", "health").returncode == 3


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "wintrain"
    assert script.exists(), "run `make install` (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout


def test_training_run_futures_pipeline_and_async(sdk):
    import asyncio

    from sdk import RunJobFailedError

    run = sdk.runs.create(r=4, alpha=8, seed=3)
    example = {"input_ids": [5, 6, 7, 8], "target_ids": [6, 7, 8, 9]}
    # Queue everything first; results come back in order afterwards.
    futures = []
    for _ in range(3):
        futures.append(run.forward_backward([example]))
        futures.append(run.optim_step(learning_rate=1e-2))
    results = [f.result(timeout=120) for f in futures]
    losses = [r["loss"] for r in results[::2]]
    assert losses[-1] < losses[0]
    assert [r["step"] for r in results[1::2]] == [1, 2, 3]
    assert futures[0].done()

    async def pipelined() -> tuple[dict, dict]:
        fb = await run.forward_backward_async([example])
        sampled = await run.sample_async(prompts=["hi"], num_samples=2, max_tokens=3, seed=1)
        return fb, sampled

    fb, sampled = asyncio.run(pipelined())
    assert fb["loss"] < losses[0] and len(sampled["results"][0]["samples"]) == 2
    saved = run.save_state("sdk-state").result()
    assert saved["path"] in [c["path"] for c in run.checkpoints()]
    assert run.id in [r["id"] for r in sdk.runs.list()]
    with pytest.raises(RunJobFailedError):
        run.forward_backward([{"input_ids": [1], "target_ids": [2], "weights": [0]}]).result()
    with pytest.raises(InvalidRequestError):
        run.forward_backward([{"input_ids": [1, 2], "target_ids": [2]}])
    assert run.delete()["status"] == "deleted"
    with pytest.raises(ConflictError):
        run.sample(prompts=["x"])


def test_cli_runs_commands(server):
    created = cli(server, "--json", "runs", "create", "--rank", "4", "--alpha", "8")
    assert created.returncode == 0, created.stderr
    run_id = json.loads(created.stdout)["id"]
    sampled = cli(server, "--json", "runs", "sample", run_id, "hello", "--max-tokens", "2", "--num-samples", "2")
    assert sampled.returncode == 0, sampled.stderr
    assert len(json.loads(sampled.stdout)["results"][0]["samples"]) == 2
    assert run_id in [r["id"] for r in json.loads(cli(server, "--json", "runs", "list").stdout)]
    assert cli(server, "--json", "runs", "checkpoints", "--run-id", run_id).returncode == 0
    assert cli(server, "runs", "delete", run_id).returncode == 0
    assert cli(server, "runs", "sample", run_id, "hello").returncode == 2  # a deleted run: 409
