"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, tmp settings, and a TestClient."""

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from entity.task import TaskRow, TaskStatus, utcnow
from main import create_app
from util.settings import PROJECT_ROOT, Settings, load_settings

REAL_BASE = PROJECT_ROOT / "model" / "base" / "SmolLM2-135M-Instruct"
SAMPLE = PROJECT_ROOT / "test" / "data" / "train_sample.json"
TINY_NAME = "tiny-llama"
pytest_plugins = ["browser", "pg"]  # Chromium fixtures (test/browser.py), PostgreSQL fixtures (test/pg.py)


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding base/tiny-llama: 2 layers, hidden 64, random weights, the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (REAL_BASE / "tokenizer_config.json").exists():
        pytest.fail("The default model is not prepared; run `make model` (the test command does).")
    root = tmp_path_factory.mktemp("model_store")
    out = root / "base" / TINY_NAME
    tok = AutoTokenizer.from_pretrained(str(REAL_BASE))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,  # at the default 0.02 greedy decoding only ever emits newlines
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return root


def make_settings(tmp_path: Path, model_root: Path) -> Settings:
    """Settings rooted in per-test tmp dirs; the model store links the shared tiny base model."""
    data_dir = tmp_path / "data"
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    if not (model_dir / "base").exists():
        (model_dir / "base").symlink_to(model_root / "base", target_is_directory=True)
    return load_settings(
        PROJECT_ROOT / "config.yaml",
        {
            "paths": {"data_dir": data_dir, "model_dir": model_dir, "db_path": tmp_path / "tasks.db"},
            "models": {"base_model": TINY_NAME},
            "jobs": {"poll_interval": 0.2, "cancel_grace_seconds": 2.0, "max_concurrent_jobs": 1},
            "train": {"max_length": 256},
        },
    )


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_root: Path) -> Settings:
    """Per-test settings with a fresh data dir and task DB (on PostgreSQL when parametrized so, see test/pg.py)."""
    settings = make_settings(tmp_path, tiny_model_root)
    if getattr(request, "param", "sqlite") == "postgresql":
        from pg import with_database

        settings = with_database(settings, request.getfixturevalue("pg_url"))
    return settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient running the app's lifespan (store, scheduler)."""
    with TestClient(create_app(settings)) as c:
        yield c


def add_task(
    client: TestClient, status: TaskStatus, output_dir: str | None, kind: str = "train", request: dict | None = None
) -> str:
    """Insert a task row as a finished (or failed) run would leave it."""
    store = client.app.state.store
    task_id = store.new_id()
    with store.session() as s:
        s.add(
            TaskRow(
                id=task_id,
                kind=kind,
                status=status,
                request=request or {},
                output_dir=output_dir,
                created_at=utcnow(),
                finished_at=utcnow(),
            )
        )
    return task_id


@pytest.fixture
def adapter_dir(settings: Settings) -> Path:
    """A LoRA adapter on the tiny base, saved like a LoRA train task's output (random, non-zero B)."""
    base = settings.base_model_path()
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    out = settings.model_dir / "outputs" / "lora-out"
    model.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[object]) -> Path:
    """Write records as JSONL (strings are written as raw lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_for(client: TestClient, task_id: str, until: set[str], timeout: float = 180.0) -> dict:
    """Poll a task's status until it is in `until` (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.get(f"/api/train/status/{task_id}").json()
        if task["status"] in until:
            return task
        time.sleep(0.3)
    pytest.fail(f"task {task_id} did not reach {until}; last: {task['status']} {task.get('error')}")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, model_root: Path, extra: dict | None = None) -> tuple[str, subprocess.Popen]:
    """Start `python main.py --config ... --port N` on the tiny model in its own process; wait for /health."""
    cfg = {
        "paths": {"data_dir": str(workdir / "data"), "model_dir": str(model_root), "db_path": str(workdir / "t.db")},
        "models": {"base_model": TINY_NAME},
        "jobs": {"poll_interval": 0.2},
        **(extra or {}),
    }
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--config", str(config), "--port", str(port), "--log-level", "warning"],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not answer /health: {log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by start_server."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


DEFAULT_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def default_named_model_root(tiny_model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store whose base/SmolLM2-135M-Instruct is a copy of the tiny model, so docs naming it run as written."""
    import shutil

    root = tmp_path_factory.mktemp("default_named_store")
    shutil.copytree(tiny_model_root / "base" / TINY_NAME, root / "base" / DEFAULT_NAME)
    return root


LONGEST_FIRST = ("test_readme.py", "test_fuzz.py", "test_openapi.py", "test_train_config.py", "test_tinker.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first (the rest keep their order), so `make test`'s two workers end together."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
