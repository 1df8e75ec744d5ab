"""The CLI's help: every option explained, usage examples, flags shown as flags; tables for people, JSON for scripts."""

import json
import subprocess
import sys

import click
import pytest
import typer

from conftest import SAMPLE, start_server, stop_server
from sdk.cli import app
from util.settings import PROJECT_ROOT


def commands(group: click.Group, prefix: str = "wintrain") -> list[tuple[str, click.Command]]:
    """Every command and group, with its full name."""
    found: list[tuple[str, click.Command]] = [(prefix, group)]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            found += commands(cmd, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", cmd))
    return found


def test_every_option_and_argument_has_help():
    missing = []
    for name, cmd in commands(typer.main.get_command(app)):
        for param in cmd.params:
            if param.name in ("help", "install_completion", "show_completion"):
                continue
            if not getattr(param, "help", None):
                missing.append(f"{name} {param.name}")
    assert not missing, f"no help text: {missing}"


def test_groups_show_usage_examples_and_flags_as_flags():
    for name, cmd in commands(typer.main.get_command(app)):
        if isinstance(cmd, click.Group):
            assert "Examples:" in (cmd.epilog or ""), f"{name} has no usage examples"
    shown = subprocess.run([sys.executable, "-m", "sdk.cli", "--help"], capture_output=True, text=True,
                           cwd=PROJECT_ROOT, env={"COLUMNS": "120", "PATH": ""})  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "Examples:" in shown.stdout and "wintrain train start" in shown.stdout
    json_line = next(line for line in shown.stdout.splitlines() if line.strip().startswith("--json"))
    assert "<bool>" not in json_line and "BOOLEAN" not in json_line


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root):
    """A live server with the sample uploaded."""
    url, proc = start_server(tmp_path_factory.mktemp("cli_help"), tiny_model_root)
    yield url
    stop_server(proc)


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI against the server with a wide terminal."""
    return subprocess.run([sys.executable, "-m", "sdk.cli", "--base-url", url, *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120, env={"COLUMNS": "200", "PATH": ""})  # fmt: skip


def test_health_and_data_commands_render_tables_and_json(server, tmp_path):
    table = cli(server, "health")
    assert table.returncode == 0, table.stderr
    assert "base_model" in table.stdout and "tiny-llama" in table.stdout and "{" not in table.stdout
    assert json.loads(cli(server, "--json", "health").stdout)["status"] == "ok"
    assert cli(server, "data", "upload", str(SAMPLE)).returncode == 0
    again = cli(server, "data", "upload", str(SAMPLE))
    assert again.returncode == 2 and "--overwrite" in again.stderr and "overwrite=True" not in again.stderr
    report = cli(server, "data", "validate", "uploads/train_sample.json")
    assert report.returncode == 0, report.stderr
    assert "duplicate_count" in report.stdout and "valid_count" in report.stdout and "{" not in report.stdout
    split = cli(server, "--json", "data", "process", "uploads/train_sample.json", "--output-dir", "s")
    assert json.loads(split.stdout)["splits"]["train"]["count"] > 0
    shown = cli(server, "data", "process", "uploads/train_sample.json", "--output-dir", "s", "--overwrite")
    assert shown.returncode == 0 and "duplicates_dropped" in shown.stdout and "train" in shown.stdout


def test_tables_print_full_job_ids(server):
    started = cli(server, "--json", "train", "start", "s/train.jsonl", "--set", "max_steps=1")
    job_id = json.loads(started.stdout)["id"]
    cli(server, "train", "cancel", job_id)
    listed = cli(server, "train", "list")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout
