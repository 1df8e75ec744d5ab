"""The `wintrain` command line (typer + rich).

Exit codes: 0 success; 1 a failed or cancelled job, or a server error (5xx); 2 bad usage, including a
request the server refuses (4xx: invalid input, unknown id, bad key); 3 the server is unreachable.
"""

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sdk.client import TuningClient
from sdk.errors import APIConnectionError, APIStatusError, JobFailedError
from sdk.job import Job

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

app = typer.Typer(help="Win-Train: train, evaluate, serve and export LLMs.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: upload, validate, process.", no_args_is_help=True)
train_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
export_app = typer.Typer(help="Exports: onnx, merged, archive.", no_args_is_help=True)
runs_app = typer.Typer(help="Low-level training runs (forward_backward / optim_step / sample).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(export_app, name="export")
app.add_typer(runs_app, name="runs")
console = Console()
errors = Console(stderr=True)


class State:
    """Options shared by every command."""

    base_url: str | None = None
    api_key: str | None = None
    json: bool = False


state = State()


@app.callback()
def main(
    base_url: Annotated[str | None, typer.Option(envvar="WINTRAIN_BASE_URL", help="Server URL.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="WINTRAIN_API_KEY", help="API key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Talk to a Win-Train server (default http://127.0.0.1:8801)."""
    state.base_url, state.api_key, state.json = base_url, api_key, as_json


def client() -> TuningClient:
    """A client from the shared options."""
    return TuningClient(base_url=state.base_url, api_key=state.api_key)


def out(value: Any, table: Table | str | None = None) -> None:
    """Print JSON with --json, else the rich rendering."""
    if state.json:
        print(json.dumps(value, indent=2, default=str))
    elif table is not None:
        console.print(table)
    else:
        console.print_json(json.dumps(value, default=str))


def job_dict(job: Job) -> dict[str, Any]:
    """A job as JSON-friendly data."""
    data = asdict(job)
    data.pop("raw", None)
    data["duration"] = job.duration
    return data


def jobs_table(jobs: list[Job], title: str = "jobs") -> Table:
    """A rich table of jobs."""
    table = Table(title=title)
    for col in ("id", "kind", "status", "progress", "step", "loss", "created"):
        table.add_column(col)
    for j in jobs:
        step = f"{j.current_step}/{j.total_steps}" if j.total_steps else str(j.current_step)
        loss = f"{j.loss:.4f}" if j.loss is not None else "-"
        created = j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-"
        table.add_row(j.id, j.kind, j.status, f"{j.progress:.0f}%", step, loss, created)
    return table


def finish(job: Job) -> None:
    """Print a final job and exit 1 if it failed."""
    out(job_dict(job), jobs_table([job], "job") if not job.is_failed else None)
    if job.is_failed:
        if not state.json:
            errors.print(f"[red]job {job.id} {job.status}[/red]: {job.error or ''}")
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def handled() -> Iterator[None]:
    """Map SDK errors to messages and exit codes."""
    try:
        yield
    except APIConnectionError as exc:
        errors.print(f"[red]server unreachable[/red]: {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc
    except APIStatusError as exc:
        errors.print(f"[red]{exc.status_code} {exc.error_type}[/red]: {exc.message}")
        raise typer.Exit(EXIT_USAGE if exc.status_code < 500 else EXIT_FAILED) from exc
    except JobFailedError as exc:
        finish(exc.job)


def run(fn: Any) -> Any:
    """Call the server with SDK errors mapped to exit codes."""
    with handled():
        return fn()


def run_call(fn: Any) -> Any:
    """Like run(), also mapping a failed run job to exit code 1."""
    from sdk.errors import RunJobFailedError

    try:
        return run(fn)
    except RunJobFailedError as exc:
        errors.print(f"[red]job failed[/red]: {exc}")
        raise typer.Exit(EXIT_FAILED) from exc


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are parsed as JSON when they can be (numbers, booleans, lists)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got '{pair}'", param_hint="--set")
        try:
            result[key] = json.loads(raw)
        except ValueError:
            result[key] = raw
    return result


# -- server and status ----------------------------------------------------------------------------------


@app.command()
def server(
    config: Annotated[Path | None, typer.Option(help="Config file.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback host without API keys.")] = False,
) -> None:
    """Start the service."""
    from main import main as serve

    argv = ["serve"]
    for flag, value in (("--config", config), ("--host", host), ("--port", port)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--insecure"] * insecure + ["--reload"] * reload
    raise typer.Exit(serve(argv))


@app.command()
def health() -> None:
    """The server's health."""
    out(run(lambda: client().health()))


@app.command()
def status() -> None:
    """Server state and a summary of recent jobs."""
    with client() as c:
        info = run(c.health)
        jobs = run(lambda: c.tunings.list(limit=10))
    if state.json:
        out({"health": info, "jobs": [job_dict(j) for j in jobs]})
        return
    table = Table(title="server")
    table.add_column("field")
    table.add_column("value")
    for key in ("status", "version", "uptime_seconds", "base_model"):
        table.add_row(key, str(info.get(key)))
    table.add_row("device", f"{info['device']['type']} {info['device'].get('name') or ''}".strip())
    table.add_row("jobs", ", ".join(f"{k} {v}" for k, v in info["jobs"].items()))
    console.print(table)
    console.print(jobs_table(jobs, "recent jobs"))


@app.command()
def version() -> None:
    """The CLI's version (and the server's, when reachable)."""
    from util.settings import VERSION

    info: dict[str, Any] = {"cli": VERSION}
    try:
        with client() as c:
            info["server"] = c.health().get("version")
    except (APIConnectionError, APIStatusError):
        info["server"] = None
    out(info, f"wintrain {VERSION} (server: {info['server'] or 'unreachable'})")


# -- data -------------------------------------------------------------------------------------------------


@data_app.command("upload")
def data_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A local file.")],
    overwrite: bool = False,
) -> None:
    """Upload a local dataset into the server's data/uploads/."""
    out(run(lambda: client().data.upload(file, overwrite=overwrite)))


@data_app.command("validate")
def data_validate(
    file: Annotated[str, typer.Argument(help="Dataset path on the server (relative to its data dir).")],
    max_length: int | None = None,
) -> None:
    """Validate a dataset: errors per line, formats and token statistics."""
    report = run(lambda: client().data.validate(file, max_length=max_length))
    out(report)
    if not report.get("valid", False):
        raise typer.Exit(EXIT_FAILED)


@data_app.command("process")
def data_process(
    file: Annotated[str, typer.Argument(help="Dataset path on the server.")],
    output_dir: Annotated[str, typer.Option(help="Output folder (relative to the data dir).")] = "processed",
    split: Annotated[str, typer.Option(help="train,val,test ratios.")] = "0.8,0.1,0.1",
    seed: int = 42,
    overwrite: bool = False,
) -> None:
    """Normalise a dataset and split it into train/val/test."""
    try:
        ratios = tuple(float(x) for x in split.split(","))
    except ValueError as exc:
        raise typer.BadParameter("use three numbers like 0.8,0.1,0.1", param_hint="--split") from exc
    if len(ratios) != 3:
        raise typer.BadParameter("use three numbers like 0.8,0.1,0.1", param_hint="--split")
    out(run(lambda: client().data.process(file, output_dir, split=ratios, seed=seed, overwrite=overwrite)))


# -- training ---------------------------------------------------------------------------------------------


@train_app.command("start")
def train_start(
    file: Annotated[str | None, typer.Argument(help="Training dataset path on the server.")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A YAML/JSON train request file (see examples/train.yaml); replaces FILE."),
    ] = None,
    strategy: Annotated[str, typer.Option(help="trl (full SFT) or lora.")] = "lora",
    model: Annotated[str | None, typer.Option(help="Base model or a trained task id.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Hyperparameter key=value (repeat).")] = None,
    output_dir: str | None = None,
    wait: Annotated[bool, typer.Option(help="Wait with a live progress bar.")] = False,
) -> None:
    """Start a training job from a dataset path and options, or from a --config file."""
    if (file is None) == (config is None):
        errors.print("[red]give a dataset FILE or --config train.yaml (not both)[/red]")
        raise typer.Exit(EXIT_USAGE)
    if config is not None and not config.is_file():
        errors.print(f"[red]config file not found[/red]: {config}")
        raise typer.Exit(EXIT_USAGE)
    params = parse_sets(set_ or [])
    with client() as c:
        if config is not None:
            job = run(lambda: c.tunings.create_from_config(config))
        else:
            job = run(lambda: c.tunings.create(file, model=model, strategy=strategy, hyperparameters=params,
                                               output_dir=output_dir))  # fmt: skip
        if wait:
            job = run(lambda: c.tunings.wait(job.id, show_progress=not state.json, raise_on_failure=False))
            finish(job)
            return
    out(job_dict(job), f"started {job.id} ({job.status})")


@train_app.command("list")
def train_list(status: str | None = None, kind: str | None = None, limit: int = 50) -> None:
    """List jobs, newest first."""
    jobs = run(lambda: client().tunings.list(status=status, kind=kind, limit=limit))
    out([job_dict(j) for j in jobs], jobs_table(jobs))


@train_app.command("status")
def train_status(job_id: str) -> None:
    """A job's state (and a training job's data statistics)."""
    job = run(lambda: client().tunings.get(job_id))
    out(job_dict(job), jobs_table([job], "job"))
    if job.data_stats and not state.json:
        console.print(data_stats_table(job.data_stats))


def data_stats_table(stats: dict[str, Any]) -> Table:
    """A rich table of a training job's data statistics."""
    counts = ", ".join(f"{k} {stats.get(k, 0)}" for k in ("records", "processed", "truncated", "skipped", "failed"))
    table = Table(title=f"training data: {counts} (max_length {stats.get('max_length')})")
    for col in ("tokens per record", "min", "mean", "median", "p95", "max"):
        table.add_column(col)
    for label, key in (("before truncation", "length_before_truncation"), ("after", "length_after_truncation")):
        row = stats.get(key) or {}
        table.add_row(label, *(str(row.get(k, "-")) for k in ("min", "mean", "median", "p95", "max")))
    return table


@train_app.command("cancel")
def train_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    job = run(lambda: client().tunings.cancel(job_id))
    out(job_dict(job), f"{job.id} {job.status}")


@train_app.command("logs")
def train_logs(
    job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False
) -> None:
    """A job's events; with --follow, live until it ends."""
    with client() as c, handled():
        if not follow:
            events = c.request("GET", f"/api/train/logs/{job_id}")
            lines = [f"{e['created_at']} {e['type']:10} {e.get('message') or ''}" for e in events["items"]]
            out(events, "\n".join(lines))
            return
        for event in c.tunings.stream_logs(job_id):
            if state.json:
                print(json.dumps(event), flush=True)
            else:
                console.print(f"{event['event']:10} {event.get('message') or event.get('status', '')}")


# -- chat, eval, export -----------------------------------------------------------------------------------


@app.command()
def chat(
    prompt: str,
    model: str | None = None,
    stream: Annotated[bool, typer.Option(help="Print pieces as they are generated.")] = False,
    max_tokens: int | None = None,
    temperature: float = 0.7,
) -> None:
    """Ask a model one question."""
    params = {"max_tokens": max_tokens, "temperature": temperature}
    with client() as c, handled():
        if stream and not state.json:
            for event in c.inference.stream(prompt, model=model, **params):
                if event["type"] == "delta":
                    sys.stdout.write(event["content"])
                    sys.stdout.flush()
            sys.stdout.write("\n")
            return
        answer = c.inference.chat(prompt, model=model, **params)
    out(answer, answer["content"])


@app.command("eval")
def evaluate(
    dataset: Annotated[str, typer.Argument(help="Dataset path on the server.")],
    model: str | None = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated.")] = "loss,perplexity,accuracy",
    compare_with: str | None = None,
    accuracy_mode: str = "exact_match",
    max_samples: int | None = None,
) -> None:
    """Evaluate a model on a dataset (optionally against another) and wait for the result."""
    params = {"accuracy_mode": accuracy_mode, "max_samples": max_samples}
    job = run(
        lambda: client().eval.evaluate(
            dataset, model=model, metrics=metrics.split(","), compare_with=compare_with, **params
        )
    )
    if job.is_failed:
        finish(job)
    out(job_dict(job) if state.json else job.metrics)


def _export(kind: str, model: str | None, params: dict[str, Any]) -> None:
    """Run an export and print its verification."""
    job = run(lambda: getattr(client().export, kind)(model=model, **params))
    if job.is_failed:
        finish(job)
    out(job_dict(job) if state.json else job.metrics)


@export_app.command("onnx")
def export_onnx(
    model: Annotated[str | None, typer.Argument(help="Model, task id or folder (default: the base model).")] = None,
    output_path: str | None = None,
    opset_version: int = 17,
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Export to ONNX and verify it in onnxruntime."""
    params = {"output_path": output_path, "opset_version": opset_version, "dtype": dtype, "overwrite": overwrite}
    _export("onnx", model, params)


@export_app.command("merged")
def export_merged(model: str, output_path: str | None = None, overwrite: bool = False) -> None:
    """Merge a LoRA into its base and verify the logits."""
    _export("merged", model, {"output_path": output_path, "overwrite": overwrite})


@export_app.command("archive")
def export_archive(
    model: Annotated[str | None, typer.Argument()] = None,
    output_path: str | None = None,
    download: Annotated[Path | None, typer.Option(help="Also save the archive here.")] = None,
    overwrite: bool = False,
) -> None:
    """Write a tar.gz of the model or adapter (and download it)."""
    with client() as c:
        job = run(lambda: c.export.archive(model=model, output_path=output_path, overwrite=overwrite))
        if job.is_failed:
            finish(job)
        if download is not None:
            saved = run(lambda: c.export.download(job.id, download))
            job.metrics = {**(job.metrics or {}), "downloaded_to": str(saved)}
    out(job_dict(job) if state.json else job.metrics)


# -- low-level runs ---------------------------------------------------------------------------------------


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """A rich table of runs."""
    table = Table(title="runs")
    for col in ("id", "status", "base_model", "lora r", "steps", "device", "created"):
        table.add_column(col)
    for r in runs:
        created = str(r["created_at"])[:19]
        table.add_row(
            r["id"], r["status"], r["base_model"], str(r["lora"].get("r")), str(r["steps"]), r["device"] or "-", created
        )
    return table


@runs_app.command("create")
def runs_create(
    base_model: str | None = None, rank: int = 16, alpha: int = 32, seed: int = 0, from_state: str | None = None
) -> None:
    """Start a run: a worker holding the base model, a fresh LoRA (or a saved state) and its optimizer."""
    run = run_call(lambda: client().runs.create(base_model=base_model, r=rank, alpha=alpha, seed=seed,
                                                from_state=from_state))  # fmt: skip
    out(run.info, runs_table([run.info]))


@runs_app.command("list")
def runs_list() -> None:
    """Every run, newest first."""
    runs = run_call(lambda: client().runs.list())
    out(runs, runs_table(runs))


@runs_app.command("sample")
def runs_sample(
    run_id: str,
    prompt: str,
    num_samples: int = 1,
    max_tokens: int = 64,
    temperature: float = 1.0,
    seed: int | None = None,
) -> None:
    """Sample from a run's current weights (the prompt is sent as a user message)."""
    messages = [[{"role": "user", "content": prompt}]]
    result = run_call(
        lambda: client().runs.get(run_id).sample(messages=messages, num_samples=num_samples, max_tokens=max_tokens,
                                                 temperature=temperature, seed=seed).result()
    )  # fmt: skip
    texts = [s["text"] for s in result["results"][0]["samples"]]
    out(result, "\n---\n".join(texts))


@runs_app.command("checkpoints")
def runs_checkpoints(run_id: Annotated[str | None, typer.Option("--run-id")] = None) -> None:
    """Saved states (usable as `model` for chat, eval and export)."""
    items = run_call(lambda: client().runs.checkpoints(run_id))
    table = Table(title="checkpoints")
    for col in ("run_id", "name", "step", "path", "created"):
        table.add_column(col)
    for c in items:
        table.add_row(c["run_id"], c["name"], str(c["step"]), c["path"], str(c["created_at"])[:19])
    out(items, table)


@runs_app.command("delete")
def runs_delete(run_id: str) -> None:
    """Free a run."""
    out(run_call(lambda: client().runs.get(run_id).delete()), f"deleted {run_id}")


@app.command()
def demo(rounds: int = 2, samples: int = 4, train: int = 100, heldout: int = 40, max_tokens: int = 128) -> None:
    """Run the rejection-sampling SFT demo (examples/rejection_sampling_sft.py) against the server."""
    import subprocess

    from util.settings import PROJECT_ROOT

    script = PROJECT_ROOT / "examples" / "rejection_sampling_sft.py"
    options = {"--rounds": rounds, "--samples": samples, "--train": train, "--heldout": heldout}
    cmd = [sys.executable, str(script), "--max-tokens", str(max_tokens)]
    cmd += [str(x) for pair in options.items() for x in pair]
    for flag, value in (("--base-url", state.base_url), ("--api-key", state.api_key)):
        if value:
            cmd += [flag, value]
    raise typer.Exit(subprocess.call(cmd))


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    entry()
