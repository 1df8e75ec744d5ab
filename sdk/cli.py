"""The `wintrain` command line (typer + rich).

Exit codes: 0 success; 1 a failed or cancelled job, or a server error (5xx); 2 bad usage, including a
request the server refuses (4xx: invalid input, unknown id, bad key); 3 the server is unreachable.
"""

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sdk import __version__ as SDK_VERSION
from sdk.client import TuningClient
from sdk.errors import OVERWRITE_HINT, APIConnectionError, APIStatusError, JobFailedError
from sdk.job import Job

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def examples(*lines: str) -> str:
    """An epilog of usage examples, kept as written (click's backspace marker stops it rewrapping them)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


# Plain (click) help: flags show as flags (`--json`), not as options taking a `<bool>`.
PLAIN = {"no_args_is_help": True, "rich_markup_mode": None}
app = typer.Typer(
    help="Win-Train: train, evaluate, serve and export LLMs. The server is WINTRAIN_BASE_URL (default "
    "http://127.0.0.1:8801); put --json before the command for machine-readable output.",
    epilog=examples(
        "wintrain health",
        "wintrain data upload examples/data/capitals.jsonl --overwrite",
        "wintrain data process uploads/capitals.jsonl --output-dir capitals --split 0.7,0.1,0.2",
        "wintrain train start capitals/train.jsonl --set max_steps=30 --set learning_rate=1e-3 --wait",
        "JOB_ID=$(wintrain --json train list --limit 1 | jq -r '.[0].id')",
        "wintrain chat 'Capital of Peru?' --model $JOB_ID",
        "wintrain eval capitals/test.jsonl --model $JOB_ID --compare-with SmolLM2-135M-Instruct",
    ),
    **PLAIN,
)
data_app = typer.Typer(
    help="Datasets: upload, validate, process.",
    epilog=examples(
        "wintrain data upload examples/data/capitals.jsonl --overwrite",
        "wintrain data validate uploads/capitals.jsonl --max-length 512",
        "wintrain data process uploads/capitals.jsonl --output-dir capitals --split 0.7,0.1,0.2 --overwrite",
    ),
    **PLAIN,
)
train_app = typer.Typer(
    help="Training jobs.",
    epilog=examples(
        "wintrain train start capitals/train.jsonl --strategy lora --set max_steps=30 --wait",
        "wintrain train list --status running",
        "wintrain train logs JOB_ID --follow",
        "wintrain train cancel JOB_ID",
    ),
    **PLAIN,
)
export_app = typer.Typer(
    help="Exports: onnx, merged, archive.",
    epilog=examples(
        "wintrain export onnx JOB_ID --output-path exports/my-onnx --overwrite",
        "wintrain export merged JOB_ID",
        "wintrain export archive JOB_ID --download .",
    ),
    **PLAIN,
)
runs_app = typer.Typer(
    help="Low-level training runs (forward_backward / optim_step / sample).",
    epilog=examples("wintrain runs create --rank 16", "wintrain runs sample RUN_ID '2+3?' --num-samples 4"),
    **PLAIN,
)
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


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    """A two-column field/value table."""
    table = Table(title=title)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return table


def jobs_table(jobs: list[Job], title: str = "jobs") -> Table:
    """A rich table of jobs; ids are shown in full (they are what the other commands take)."""
    table = Table(title=title)
    table.add_column("id", no_wrap=True, min_width=32)
    for col in ("kind", "status", "progress", "step", "loss", "created"):
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
        message = exc.message
        if exc.status_code == 409 and "overwrite" in message:  # the server names its JSON field; say the flag
            message = message.replace(OVERWRITE_HINT, "") + " (here: rerun with --overwrite)"
        errors.print(f"[red]{exc.status_code} {exc.error_type}[/red]: {message}")
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


NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are parsed as JSON when they can be (numbers, booleans, lists).

    Numbers JSON spells otherwise (`.5`, `1.`, `+3`) are numbers too: the server refuses a number sent as text.
    """
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got '{pair}'", param_hint="--set")
        try:
            result[key] = json.loads(raw)
        except ValueError:
            if NUMBER.fullmatch(raw.strip()):
                text = raw.strip()
                result[key] = float(text) if any(c in text for c in ".eE") else int(text)
            else:
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
    """Start the service (needs the server installed beside the SDK, e.g. `pip install -e .` in the project)."""
    try:
        from main import main as serve  # lazy: the SDK alone imports neither the server, torch nor FastAPI
    except ImportError as exc:
        errors.print(
            f"[red]the server is not installed here[/red] ({exc}); run it from a Win-Train checkout: "
            "`make run` or `.venv/bin/python main.py`."
        )
        raise typer.Exit(EXIT_USAGE) from exc

    argv = ["serve"]
    for flag, value in (("--config", config), ("--host", host), ("--port", port)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--insecure"] * insecure + ["--reload"] * reload
    raise typer.Exit(serve(argv))


@app.command()
def health() -> None:
    """The server's health: status, version, device, jobs and inference counters."""
    info = run(lambda: client().health())
    device = info.get("device") or {}
    rows = {
        "status": info.get("status"),
        "version": info.get("version"),
        "uptime_seconds": info.get("uptime_seconds"),
        "base_model": info.get("base_model"),
        "device": f"{device.get('type', '?')} {device.get('name') or ''}".strip(),
        **{f"jobs.{k}": v for k, v in (info.get("jobs") or {}).items()},
        **{f"inference.{k}": v for k, v in (info.get("inference") or {}).items()},
    }
    out(info, kv_table("health", {k: str(v) for k, v in rows.items()}))


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
    info: dict[str, Any] = {"cli": SDK_VERSION}
    try:
        with client() as c:
            info["server"] = c.health().get("version")
    except (APIConnectionError, APIStatusError):
        info["server"] = None
    out(info, f"wintrain {SDK_VERSION} (server: {info['server'] or 'unreachable'})")


# -- data -------------------------------------------------------------------------------------------------


@data_app.command("upload")
def data_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A local file.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier upload of the same name.")] = False,
) -> None:
    """Upload a local dataset into the server's data/uploads/."""
    stored = run(lambda: client().data.upload(file, overwrite=overwrite))
    out(stored, kv_table("uploaded", {k: str(v) for k, v in stored.items()}))


@data_app.command("validate")
def data_validate(
    file: Annotated[str, typer.Argument(help="Dataset path on the server (relative to its data dir).")],
    max_length: Annotated[
        int | None, typer.Option(help="Count records longer than this many tokens (default: the server's).")
    ] = None,
) -> None:
    """Validate a dataset: errors per line, duplicates, formats and token statistics (exit 1 if invalid)."""
    report = run(lambda: client().data.validate(file, max_length=max_length))
    out(report, validate_tables(report))
    if not report.get("valid", False):
        raise typer.Exit(EXIT_FAILED)


@data_app.command("process")
def data_process(
    file: Annotated[str, typer.Argument(help="Dataset path on the server.")],
    output_dir: Annotated[str, typer.Option(help="Output folder (relative to the data dir).")] = "processed",
    split: Annotated[str, typer.Option(help="train,val,test ratios.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed (same seed, same split).")] = 42,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing split files.")] = False,
) -> None:
    """Normalise a dataset and split it into train/val/test."""
    try:
        ratios = tuple(float(x) for x in split.split(","))
    except ValueError as exc:
        raise typer.BadParameter("use three numbers like 0.8,0.1,0.1", param_hint="--split") from exc
    if len(ratios) != 3:
        raise typer.BadParameter("use three numbers like 0.8,0.1,0.1", param_hint="--split")
    done = run(lambda: client().data.process(file, output_dir, split=ratios, seed=seed, overwrite=overwrite))
    table = kv_table("processed", {k: str(done[k]) for k in ("output_dir", "total", "kept", "invalid_dropped",
                                                             "duplicates_dropped")})  # fmt: skip
    for name, split_file in done["splits"].items():
        table.add_row(name, f"{split_file['count']} records: {split_file['path']}")
    out(done, table)


def validate_tables(report: dict[str, Any]) -> Table:
    """Validate's report: counts, formats, token stats, then each error and duplicate with its line."""
    rows = {k: str(report.get(k)) for k in ("file_path", "valid", "total", "valid_count", "invalid_count",
                                            "duplicate_count")}  # fmt: skip
    rows["formats"] = ", ".join(f"{k} {v}" for k, v in (report.get("formats") or {}).items()) or "-"
    stats = report.get("token_stats") or {}
    if stats:
        rows["tokens"] = (f"min {stats['min']}, median {stats['median']:g}, p95 {stats['p95']:g}, max {stats['max']}; "
                          f"{stats['over_max_length']} over {stats['max_length']}")  # fmt: skip
    table = kv_table("validation", rows)
    for error in report.get("errors") or []:
        table.add_row(f"line {error['line']}", error["reason"])
    for dup in report.get("duplicates") or []:
        table.add_row(f"line {dup['line']}", f"duplicate of line {dup['duplicate_of']}")
    return table


def eval_table(result: dict[str, Any]) -> Table:
    """An evaluation's metrics, side by side with the compared model's when there is one."""
    other = (result.get("compare_with") or {}).get("metrics") or {}
    table = Table(title=f"evaluation of {result.get('model')} on {result.get('samples')} records")
    table.add_column("metric")
    table.add_column(str(result.get("model")))
    if other:
        table.add_column(str(result["compare_with"].get("model")))
        table.add_column("better")
    for key, value in (result.get("metrics") or {}).items():
        cells = [key, _num(value)]
        if other:
            cells += [_num(other.get(key)), str((result.get("better") or {}).get(key, ""))]
        table.add_row(*cells)
    return table


def _num(value: Any) -> str:
    """A metric for a table cell."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
    output_dir: Annotated[str | None, typer.Option(help="Output folder (relative to the model dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow a non-empty output folder.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait with a live progress bar.")] = False,
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
                                               output_dir=output_dir, overwrite=overwrite))  # fmt: skip
        if wait:
            job = run(lambda: c.tunings.wait(job.id, show_progress=not state.json, raise_on_failure=False))
            finish(job)
            return
    out(job_dict(job), f"started {job.id} ({job.status})")


@train_app.command("list")
def train_list(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")] = None,
    kind: Annotated[str | None, typer.Option(help="train, eval or export.")] = None,
    limit: Annotated[int, typer.Option(help="Most jobs shown.")] = 50,
) -> None:
    """List jobs, newest first."""
    jobs = run(lambda: client().tunings.list(status=status, kind=kind, limit=limit))
    out([job_dict(j) for j in jobs], jobs_table(jobs))


@train_app.command("status")
def train_status(job_id: Annotated[str, typer.Argument(help="A job id (train, eval or export).")]) -> None:
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
def train_cancel(job_id: Annotated[str, typer.Argument(help="A queued or running job's id.")]) -> None:
    """Cancel a queued or running job."""
    job = run(lambda: client().tunings.cancel(job_id))
    out(job_dict(job), f"{job.id} {job.status}")


@train_app.command("logs")
def train_logs(
    job_id: Annotated[str, typer.Argument(help="A job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
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
    prompt: Annotated[str, typer.Argument(help="The question (sent as one user message).")],
    model: Annotated[str | None, typer.Option(help="Base model name, job id or model folder.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print pieces as they are generated.")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Most new tokens (default: the server's).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
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
    model: Annotated[str | None, typer.Option(help="Base model name, job id or model folder.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated: loss,perplexity,accuracy,bleu,rouge_l.")] = (
        "loss,perplexity,accuracy"
    ),
    compare_with: Annotated[str | None, typer.Option(help="A second model evaluated on the same records.")] = None,
    accuracy_mode: Annotated[str, typer.Option(help="exact_match, contains or numeric.")] = "exact_match",
    max_samples: Annotated[int | None, typer.Option(help="Evaluate only the first N records.")] = None,
) -> None:
    """Evaluate a model on a dataset (optionally against another), with a progress bar until the result."""
    params = {"accuracy_mode": accuracy_mode, "max_samples": max_samples}
    with client() as c:
        job = run(lambda: c.eval.evaluate(dataset, model=model, metrics=metrics.split(","), compare_with=compare_with,
                                          wait=False, **params))  # fmt: skip
        job = run(lambda: c.tunings.wait(job.id, show_progress=not state.json, raise_on_failure=False))
    if job.is_failed:
        finish(job)
    out(job_dict(job), eval_table(job.metrics or {}))


def _export(kind: str, model: str | None, params: dict[str, Any]) -> None:
    """Run an export and print its verification."""
    job = run(lambda: getattr(client().export, kind)(model=model, **params))
    if job.is_failed:
        finish(job)
    out(job_dict(job) if state.json else job.metrics)


@export_app.command("onnx")
def export_onnx(
    model: Annotated[str | None, typer.Argument(help="Model, task id or folder (default: the base model).")] = None,
    output_path: Annotated[str | None, typer.Option(help="Output folder (relative to the model dir).")] = None,
    opset_version: Annotated[int, typer.Option(help="ONNX opset, 14-23.")] = 17,
    dtype: Annotated[str, typer.Option(help="float32 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export.")] = False,
) -> None:
    """Export to ONNX and verify it in onnxruntime."""
    params = {"output_path": output_path, "opset_version": opset_version, "dtype": dtype, "overwrite": overwrite}
    _export("onnx", model, params)


@export_app.command("merged")
def export_merged(
    model: Annotated[str, typer.Argument(help="A LoRA output: job id or folder.")],
    output_path: Annotated[str | None, typer.Option(help="Output folder (relative to the model dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export.")] = False,
) -> None:
    """Merge a LoRA into its base and verify the logits."""
    _export("merged", model, {"output_path": output_path, "overwrite": overwrite})


@export_app.command("archive")
def export_archive(
    model: Annotated[str | None, typer.Argument(help="Model, job id or folder (default: the base model).")] = None,
    output_path: Annotated[str | None, typer.Option(help="Archive path (.tar.gz, relative to the model dir).")] = None,
    download: Annotated[Path | None, typer.Option(help="Also save the archive here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier archive.")] = False,
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
    table.add_column("id", no_wrap=True)
    for col in ("status", "base_model", "lora r", "steps", "device", "created"):
        table.add_column(col)
    for r in runs:
        created = str(r["created_at"])[:19]
        table.add_row(
            r["id"], r["status"], r["base_model"], str(r["lora"].get("r")), str(r["steps"]), r["device"] or "-", created
        )
    return table


@runs_app.command("create")
def runs_create(
    base_model: Annotated[str | None, typer.Option(help="Base model name or folder (default: the server's).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the fresh LoRA.")] = 0,
    from_state: Annotated[str | None, typer.Option(help="Start from a saved state folder instead.")] = None,
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
    run_id: Annotated[str, typer.Argument(help="A run id.")],
    prompt: Annotated[str, typer.Argument(help="The prompt (sent as one user message).")],
    num_samples: Annotated[int, typer.Option(help="Samples to draw.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per sample.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible.")] = None,
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
def runs_checkpoints(
    run_id: Annotated[str | None, typer.Option("--run-id", help="Only this run's states.")] = None,
) -> None:
    """Saved states (usable as `model` for chat, eval and export)."""
    items = run_call(lambda: client().runs.checkpoints(run_id))
    table = Table(title="checkpoints")
    for col in ("run_id", "name", "step", "path", "created"):
        table.add_column(col, no_wrap=col == "run_id")
    for c in items:
        table.add_row(c["run_id"], c["name"], str(c["step"]), c["path"], str(c["created_at"])[:19])
    out(items, table)


@runs_app.command("delete")
def runs_delete(run_id: Annotated[str, typer.Argument(help="A run id.")]) -> None:
    """Free a run."""
    out(run_call(lambda: client().runs.get(run_id).delete()), f"deleted {run_id}")


@app.command()
def demo(
    rounds: Annotated[int, typer.Option(help="Sample-filter-train rounds.")] = 2,
    samples: Annotated[int, typer.Option(help="Answers sampled per problem.")] = 4,
    train: Annotated[int, typer.Option(help="Training problems.")] = 100,
    heldout: Annotated[int, typer.Option(help="Held-out problems for accuracy.")] = 40,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 128,
) -> None:
    """Run the rejection-sampling SFT demo (examples/rejection_sampling_sft.py) against the server."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "examples" / "rejection_sampling_sft.py"
    if not script.is_file():
        errors.print(f"[red]{script} is missing[/red]: the demo runs from a Win-Train checkout.")
        raise typer.Exit(EXIT_USAGE)
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
