"""TuningClient: the Python SDK of the service, on httpx, with typed errors and retries."""

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from sdk.errors import APIConnectionError, APIStatusError, JobFailedError, RunJobFailedError, error_for
from sdk.job import Job

DEFAULT_BASE_URL = "http://127.0.0.1:8801"
IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}
# Friendly hyperparameter names (OpenAI/Tinker style) mapped to the train config's fields.
ALIASES = {"epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size", "steps": "max_steps"}
LORA_ALIASES = {"lora_r": "r", "rank": "r", "lora_rank": "r", "lora_alpha": "lora_alpha", "alpha": "lora_alpha"}
LORA_ALIASES |= {"lora_dropout": "lora_dropout", "target_modules": "target_modules"}


def train_config(model: str | None, hyperparameters: dict[str, Any] | None, validation_file: str | None) -> dict:
    """The `config` of a train request from friendly hyperparameters."""
    config: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for key, value in (hyperparameters or {}).items():
        if key in LORA_ALIASES:
            lora[LORA_ALIASES[key]] = value
        else:
            config[ALIASES.get(key, key)] = value
    if lora:
        config["lora_config"] = {**config.get("lora_config", {}), **lora}
    if model:
        config["model_path"] = model
    if validation_file:
        config["eval_dataset_path"] = validation_file
    return config


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """Parse SSE lines into (event, data, id) tuples."""
    event, data, event_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data), event_id
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
    if data:
        yield event, "\n".join(data), event_id


class _Resource:
    """A group of endpoints sharing the client."""

    def __init__(self, client: "TuningClient") -> None:
        """Bind to the client."""
        self._client = client


class Tunings(_Resource):
    """Training jobs: create, get, list, cancel, wait, stream_logs."""

    def create(
        self,
        training_file: str,
        model: str | None = None,
        strategy: str = "lora",
        hyperparameters: dict[str, Any] | None = None,
        validation_file: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> Job:
        """Start a training job; `training_file` is a dataset path as the server sees it."""
        body = {
            "strategy": strategy,
            "dataset_path": training_file,
            "output_dir": output_dir,
            "overwrite": overwrite,
            "config": train_config(model, hyperparameters, validation_file),
        }
        started = self._client.request("POST", "/api/train/start", json=body)
        return self.get(started["task_id"])

    def create_from_config(self, config: str | Path) -> Job:
        """Start a training job from a YAML or JSON train request (a file path, or the document itself)."""
        text = Path(config).read_text(encoding="utf-8") if isinstance(config, Path) or "\n" not in config else config
        headers = {"Content-Type": "application/yaml"}  # YAML is a superset of JSON: one media type reads both
        started = self._client.request("POST", "/api/train/start", content=text.encode("utf-8"), headers=headers)
        return self.get(started["task_id"])

    def get(self, job_id: str) -> Job:
        """A job's current state."""
        return Job.from_api(self._client.request("GET", f"/api/train/status/{job_id}"))

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        """Jobs, newest first."""
        params = {k: v for k, v in {"status": status, "kind": kind, "limit": limit, "offset": offset}.items() if v}
        page = self._client.request("GET", "/api/train/tasks", params=params)
        return [Job.from_api(t) for t in page["items"]]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job."""
        return Job.from_api(self._client.request("POST", f"/api/train/cancel/{job_id}"))

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[Job], None] | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        show_progress: bool = True,
        raise_on_failure: bool = True,
    ) -> Job:
        """Poll until the job ends; show a progress bar (percent, step, loss, ETA) unless a callback is given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(job_id) if show_progress and on_progress is None else None
        try:
            while True:
                job = self.get(job_id)
                if on_progress is not None:
                    on_progress(job)
                if bar is not None:
                    bar.update(job)
                if job.is_terminal:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.status} after {timeout}s")
                time.sleep(poll_interval)
        finally:
            if bar is not None:
                bar.close()
        if raise_on_failure and job.is_failed:
            raise JobFailedError(job)
        return job

    def stream_logs(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Live events of a job over SSE (status changes, per-step metrics, log lines) until it ends."""
        for event, data, _ in self._client.stream_sse("GET", f"/api/train/events/{job_id}", params={"after": after}):
            payload = json.loads(data)
            yield {"event": event, **payload}
            if event == "end":
                return


class _ProgressBar:
    """A rich progress bar fed from job states."""

    def __init__(self, job_id: str) -> None:
        """Start the bar."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("step {task.fields[step]}/{task.fields[steps]}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(job_id[:8], total=100, step=0, steps="?", loss="-")
        self.progress.start()

    def update(self, job: Job) -> None:
        """Show the job's latest state."""
        loss = f"{job.loss:.4f}" if job.loss is not None else "-"
        self.progress.update(
            self.task,
            completed=job.progress,
            step=job.current_step,
            steps=job.total_steps or "?",
            loss=loss,
            description=f"{job.id[:8]} {job.status}",
        )

    def close(self) -> None:
        """Stop drawing."""
        self.progress.stop()


class Data(_Resource):
    """Datasets: upload, validate, process."""

    def upload(self, path: str | Path, overwrite: bool = False) -> dict[str, Any]:
        """Upload a local file into the server's data/uploads/."""
        path = Path(path)
        with path.open("rb") as fh:
            files = {"file": (path.name, fh.read())}
        return self._client.request("POST", "/api/data/upload", files=files, data={"overwrite": str(overwrite).lower()})

    def validate(self, file_path: str, max_length: int | None = None, model: str | None = None) -> dict[str, Any]:
        """Check a dataset on the server: per-line errors, formats, token statistics."""
        body = {k: v for k, v in {"file_path": file_path, "max_length": max_length, "model": model}.items() if v}
        return self._client.request("POST", "/api/data/validate", json=body)

    def process(
        self,
        input_file: str,
        output_dir: str,
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        shuffle: bool = True,
        seed: int = 42,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Normalise a dataset and split it into train/val/test files."""
        split_config = {"train_ratio": split[0], "val_ratio": split[1], "test_ratio": split[2]}
        body = {
            "input_file": input_file,
            "output_dir": output_dir,
            "overwrite": overwrite,
            "split_config": {**split_config, "shuffle": shuffle, "seed": seed},
        }
        return self._client.request("POST", "/api/data/process", json=body)


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt string as one user message; message lists pass through."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class Inference(_Resource):
    """Chat: one answer, a stream of pieces, or a batch."""

    def chat(self, prompt: str | list[dict[str, str]], model: str | None = None, **params: Any) -> dict[str, Any]:
        """One answer: {"content", "finish_reason", "usage", "latency_ms"}."""
        body = {"messages": _messages(prompt), "model": model, **params}
        return self._client.request("POST", "/api/inference/chat", json=body)

    def stream(self, prompt: str | list[dict[str, str]], model: str | None = None, **params: Any) -> Iterator[dict]:
        """Events as they are generated: {"type": "delta", "content"}, then {"type": "done", ...}."""
        body = {"messages": _messages(prompt), "model": model, **params}
        for event, data, _ in self._client.stream_sse("POST", "/api/inference/chat/stream", json=body):
            payload = json.loads(data)
            if event == "error":
                raise APIStatusError(500, "generation_error", payload.get("message", "generation failed"))
            yield {"type": event, **payload}

    def batch(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        """Many chat requests at once; results in order, per-item errors."""
        return self._client.request("POST", "/api/inference/batch", json={"requests": requests})


class Eval(_Resource):
    """Evaluations."""

    def evaluate(
        self,
        dataset_path: str,
        model: str | None = None,
        metrics: list[str] | None = None,
        compare_with: str | None = None,
        wait: bool = True,
        **params: Any,
    ) -> Job:
        """Evaluate a model on a dataset (and compare with another); waits for the result by default."""
        body = {"dataset_path": dataset_path, "model": model, "compare_with": compare_with, "wait": wait, **params}
        if metrics:
            body["metrics"] = metrics
        answer = self._client.request("POST", "/api/eval/evaluate", json=body, **_long(wait))
        return Job.from_api(answer["task"]) if answer.get("task") else self._client.tunings.get(answer["task_id"])


class Export(_Resource):
    """Exports: ONNX, merged weights, archives."""

    def _run(self, kind: str, model: str | None, wait: bool, params: dict[str, Any]) -> Job:
        """Start an export (and wait for it by default)."""
        body = {"model": model, "wait": wait, **params}
        answer = self._client.request("POST", f"/api/export/{kind}", json=body, **_long(wait))
        return Job.from_api(answer["task"]) if answer.get("task") else self._client.tunings.get(answer["task_id"])

    def onnx(self, model: str | None = None, wait: bool = True, **params: Any) -> Job:
        """Export to ONNX and verify it in onnxruntime."""
        return self._run("onnx", model, wait, params)

    def merged(self, model: str, wait: bool = True, **params: Any) -> Job:
        """Merge a LoRA adapter into its base and verify the logits."""
        return self._run("merged", model, wait, params)

    def archive(self, model: str | None = None, wait: bool = True, **params: Any) -> Job:
        """Write a tar.gz of the model or adapter."""
        return self._run("archive", model, wait, params)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Save a succeeded archive export to `dest` (a file, or a folder to put it in)."""
        dest = Path(dest)
        with self._client.stream("GET", f"/api/export/download/{job_id}") as response:
            if dest.is_dir():
                name = response.headers.get("content-disposition", "").rpartition("filename=")[2].strip('"')
                dest = dest / (name or f"{job_id}.tar.gz")
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        return dest


class JobFuture:
    """The pending result of a run's primitive: `.result()` long-polls until the job is done."""

    def __init__(self, client: "TuningClient", queued: dict[str, Any]) -> None:
        """Wrap the server's immediate answer ({"job_id", "kind", ...})."""
        self._client = client
        self.job_id: str = queued["job_id"]
        self.kind: str = queued["kind"]
        self._job: dict[str, Any] | None = None

    def done(self) -> bool:
        """Whether the job has finished (asks the server once)."""
        if self._job is None:
            job = self._client.request("GET", f"/v1/jobs/{self.job_id}")
            if job["status"] in ("completed", "failed"):
                self._job = job
        return self._job is not None

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The job's result; raises RunJobFailedError if it failed, TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._job is None:
            remaining = 60.0 if deadline is None else max(0.1, min(60.0, deadline - time.monotonic()))
            job = self._client.request(
                "GET", f"/v1/jobs/{self.job_id}", params={"wait": "true", "timeout": remaining}, timeout=remaining + 30
            )
            if job["status"] in ("completed", "failed"):
                self._job = job
            elif deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.kind} job {self.job_id} still {job['status']} after {timeout}s")
        if self._job["status"] == "failed":
            raise RunJobFailedError(self._job)
        return self._job["result"]

    def __await__(self) -> Any:
        """`await future` waits without blocking the event loop."""
        return asyncio.to_thread(self.result).__await__()


class TrainingRun:
    """A run on the server: its primitives return futures, so a loop can queue work ahead of results."""

    def __init__(self, client: "TuningClient", info: dict[str, Any]) -> None:
        """Wrap a run as the server described it."""
        self._client = client
        self.id: str = info["id"]
        self.info = info

    def _submit(self, primitive: str, body: dict[str, Any]) -> JobFuture:
        """Queue a primitive; returns at once."""
        return JobFuture(self._client, self._client.request("POST", f"/v1/runs/{self.id}/{primitive}", json=body))

    def forward_backward(self, examples: list[dict[str, Any]], loss: str = "cross_entropy") -> JobFuture:
        """Accumulate gradients; examples are {"input_ids", "target_ids", "weights"?} or {"messages"}."""
        return self._submit("forward_backward", {"examples": examples, "loss": loss})

    def optim_step(
        self,
        learning_rate: float = 1e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
    ) -> JobFuture:
        """An AdamW step on the accumulated gradients."""
        body = {"learning_rate": learning_rate, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay}
        return self._submit("optim_step", {**body, "max_grad_norm": max_grad_norm})

    def sample(
        self,
        prompts: list[str] | None = None,
        messages: list[list[dict[str, str]]] | None = None,
        num_samples: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> JobFuture:
        """Sample with the run's current weights; the result holds texts, tokens and logprobs."""
        body = {"prompts": prompts, "messages": messages, "num_samples": num_samples, "max_tokens": max_tokens}
        return self._submit("sample", {**body, "temperature": temperature, "top_p": top_p, "seed": seed})

    def save_state(self, name: str, overwrite: bool = False) -> JobFuture:
        """Save the adapter and optimizer state; the result's `path` is usable as a model elsewhere."""
        return self._submit("save_state", {"name": name, "overwrite": overwrite})

    def load_state(self, path: str, with_optimizer: bool = True) -> JobFuture:
        """Load a saved state into this run."""
        return self._submit("load_state", {"path": path, "with_optimizer": with_optimizer})

    async def forward_backward_async(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """forward_backward, awaited."""
        return await (await asyncio.to_thread(self.forward_backward, *args, **kwargs))

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """optim_step, awaited."""
        return await (await asyncio.to_thread(self.optim_step, *args, **kwargs))

    async def sample_async(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """sample, awaited."""
        return await (await asyncio.to_thread(self.sample, *args, **kwargs))

    async def save_state_async(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """save_state, awaited."""
        return await (await asyncio.to_thread(self.save_state, *args, **kwargs))

    def refresh(self) -> dict[str, Any]:
        """The run's current state on the server."""
        self.info = self._client.request("GET", f"/v1/runs/{self.id}")
        return self.info

    def checkpoints(self) -> list[dict[str, Any]]:
        """The run's saved states."""
        return self._client.request("GET", f"/v1/runs/{self.id}/checkpoints")["items"]

    def delete(self) -> dict[str, Any]:
        """Free the run on the server."""
        self.info = self._client.request("DELETE", f"/v1/runs/{self.id}")
        return self.info


class Runs(_Resource):
    """Low-level training runs (Tinker-style)."""

    def create(
        self,
        base_model: str | None = None,
        r: int = 16,
        alpha: int = 32,
        target_modules: list[str] | str = "all-linear",
        seed: int = 0,
        from_state: str | None = None,
        with_optimizer: bool = True,
    ) -> TrainingRun:
        """Start a run with a fresh LoRA on a base model (or from a saved state)."""
        body = {
            "base_model": base_model,
            "lora": {"r": r, "alpha": alpha, "target_modules": target_modules},
            "seed": seed,
            "from_state": from_state,
            "with_optimizer": with_optimizer,
        }
        return TrainingRun(self._client, self._client.request("POST", "/v1/runs", json=body))

    def get(self, run_id: str) -> TrainingRun:
        """An existing run."""
        return TrainingRun(self._client, self._client.request("GET", f"/v1/runs/{run_id}"))

    def checkpoints(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Saved states of every run, or of one."""
        params = {"run_id": run_id} if run_id else {}
        return self._client.request("GET", "/v1/checkpoints", params=params)["items"]

    def list(self) -> list[dict[str, Any]]:  # last: inside the class body, `list` is this method from here on
        """Every run, newest first."""
        return self._client.request("GET", "/v1/runs")["items"]


class TuningClient:
    """Client of the training service: `with TuningClient(api_key=...) as client: client.tunings.create(...)`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        backoff: float = 0.5,
    ) -> None:
        """Configure the connection; base_url and api_key default to WINTRAIN_BASE_URL and WINTRAIN_API_KEY."""
        self.base_url = (base_url or os.environ.get("WINTRAIN_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("WINTRAIN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries = max_retries
        self.backoff = backoff
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.tunings = Tunings(self)
        self.data = Data(self)
        self.inference = Inference(self)
        self.eval = Eval(self)
        self.export = Export(self)
        self.runs = Runs(self)

    def __enter__(self) -> "TuningClient":
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the connection pool."""
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def health(self) -> dict[str, Any]:
        """The server's /health."""
        return self.request("GET", "/health")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; retry connection errors (and 5xx on idempotent calls) with exponential backoff."""
        idempotent = method.upper() in IDEMPOTENT
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # A request that never reached the server is safe to resend; one that may have is only if idempotent.
                if last or not (idempotent or isinstance(exc, httpx.ConnectError)):
                    raise APIConnectionError(f"{method} {self.base_url}{path}: {exc}") from exc
            else:
                if response.status_code >= 500 and idempotent and not last:
                    pass
                elif response.is_error:
                    raise error_for(response.status_code, _json(response))
                else:
                    return _json(response)
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def stream(self, method: str, path: str, **kwargs: Any) -> Any:
        """An open streaming response (raises the typed error for an error status)."""
        return _Stream(self, method, path, kwargs)

    def stream_sse(self, method: str, path: str, **kwargs: Any) -> Iterator[tuple[str, str, str | None]]:
        """(event, data, id) tuples of an SSE response."""
        with self.stream(method, path, timeout=None, **kwargs) as response:
            yield from sse_events(response.iter_lines())


class _Stream:
    """Context manager around httpx.stream that maps errors like request() does."""

    def __init__(self, client: TuningClient, method: str, path: str, kwargs: dict[str, Any]) -> None:
        """Remember the request."""
        self.client, self.method, self.path, self.kwargs = client, method, path, kwargs
        self._cm: Any = None

    def __enter__(self) -> httpx.Response:
        """Open the stream."""
        try:
            self._cm = self.client._http.stream(self.method, self.path, **self.kwargs)
            response = self._cm.__enter__()
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{self.method} {self.client.base_url}{self.path}: {exc}") from exc
        if response.is_error:
            response.read()
            self._cm.__exit__(None, None, None)
            raise error_for(response.status_code, _json(response))
        return response

    def __exit__(self, *exc: object) -> None:
        """Close the stream."""
        self._cm.__exit__(*exc)


def _long(wait: bool) -> dict[str, Any]:
    """No read timeout for a call that waits for a job to finish."""
    return {"timeout": None} if wait else {}


def _json(response: httpx.Response) -> Any:
    """The response body as JSON, or its text."""
    try:
        return response.json()
    except ValueError:
        return response.text
