"""Settings: config.yaml, overridden by WT_* environment variables, overridden by CLI flags."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config.yaml"
VERSION = "0.1.0"


# What lives beside a SQLite store's file: its journals, the migration lock, the disk reserve (service/db.py)
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", ".migrate.lock", "-reserve")


def sqlite_file_of(url: str | URL) -> Path | None:
    """The SQLite file a database URL names; None for PostgreSQL or an in-memory database."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


class ServerSettings(BaseModel):
    """Where the HTTP server listens, how loudly it logs, and the bounds every request body is held to."""

    host: str = "127.0.0.1"
    port: int = Field(8801, ge=1, le=65535)
    log_level: str = "info"
    # Largest request body of any route (also a zstd body once decompressed); uploads have data.max_upload_mb.
    max_body_mb: int = Field(64, ge=1)
    # Deepest [ / { nesting a JSON (or YAML flow) body may have; deeper is a 422 before any parser runs. Kept well
    # below Python's recursion limit, which the JSON parser and validation would otherwise run into.
    max_json_depth: int = Field(64, ge=2, le=500)


class PathSettings(BaseModel):
    """On-disk locations; relative paths resolve against the config file's folder."""

    data_dir: Path = Path("data")
    model_dir: Path = Path("model")
    db_path: Path = Path("state/tasks.db")  # outside data_dir: clients read there, and the DB is the server's alone
    allowed_roots: list[Path] = Field(default_factory=list)


class DatabaseSettings(BaseModel):
    """The task store: a SQLAlchemy URL; None keeps the embedded SQLite file at paths.db_path."""

    url: str | None = Field(None, pattern=r"^(sqlite|postgresql)(\+\w+)?://")


class ModelSettings(BaseModel):
    """The default base model: a folder name under model_dir/base, or a path."""

    base_model: str = "SmolLM2-135M-Instruct"


class JobSettings(BaseModel):
    """Background task scheduling."""

    max_concurrent_jobs: int | None = Field(None, ge=1)
    poll_interval: float = Field(0.5, gt=0)
    cancel_grace_seconds: float = Field(5.0, ge=0)
    max_queued: int | None = Field(100, ge=1)
    retry_after_seconds: int = Field(30, ge=1)
    wait_timeout_seconds: float = Field(600.0, gt=0)
    worker_nice: int = Field(10, ge=0, le=19)
    retention_days: float | None = Field(30.0, gt=0)
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_num_cpus: float = Field(1.0, gt=0)
    scheduler_id: str | None = Field(None, min_length=1, max_length=128)  # owner of claimed tasks; None: host name
    stall_seconds: float | None = Field(600.0, gt=0)  # a running task silent this long is reported stalled


Tracker = Literal["none", "tensorboard", "mlflow", "wandb"]


class TrainSettings(BaseModel):
    """Defaults for train requests that leave a field out."""

    max_length: int = Field(1024, ge=8)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    packing: Literal["auto", "on", "off"] = "auto"
    num_gpus: int | None = Field(None, ge=1)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    report_to: Tracker | list[Tracker] = "tensorboard"
    mlflow_tracking_uri: str | None = None
    experiment_name: str = "win-train"
    max_resumes: int = Field(3, ge=0)
    tokens_per_step: int | Literal["auto", "off"] = "auto"
    max_tokens_per_step: int = Field(32_768, ge=8)
    budget_memory_gib: float | None = Field(None, gt=0)


class DataSettings(BaseModel):
    """Limits for the data API."""

    max_upload_mb: int = Field(512, ge=1)
    max_errors_reported: int = Field(50, ge=1)
    max_validate_mb: float = Field(100, gt=0)
    validate_timeout_seconds: float = Field(120.0, gt=0)


class InferenceSettings(BaseModel):
    """Serving limits and the loaded-model cache."""

    cache_size: int = Field(2, ge=1)
    max_concurrent_generations: int = Field(64, ge=1)
    max_tokens_limit: int = Field(2048, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_batch_size: int = Field(64, ge=1)
    max_waiting: int = Field(256, ge=0)
    max_batch_tokens: int | None = Field(None, ge=16)
    kv_cache_blocks: int | None = Field(None, ge=1)
    cuda_graphs: bool | None = None
    graph_kv_padding: int | None = Field(None, ge=16)
    kv_cache_memory: float = Field(0.25, gt=0, le=0.95)
    max_adapters: int = Field(8, ge=1)
    engine_attention: Literal["varlen", "sdpa"] | None = None


class RunSettings(BaseModel):
    """Low-level training runs (/v1/runs): each holds a model, a LoRA and its optimizer in a worker process."""

    max_runs: int = Field(2, ge=1)
    idle_ttl_seconds: float = Field(1800.0, gt=0)
    poll_interval: float = Field(0.02, gt=0)


class AuthSettings(BaseModel):
    """API keys; with none configured the API is open (and the server only binds to loopback)."""

    api_keys: list[SecretStr] = Field(default_factory=list)


class Settings(BaseSettings):
    """All service settings; see config.yaml for each one's meaning."""

    model_config = SettingsConfigDict(env_prefix="WT_", env_nested_delimiter="__", extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    runs: RunSettings = Field(default_factory=RunSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Let environment variables win over the YAML values passed as init kwargs."""
        return env_settings, init_settings

    @property
    def data_dir(self) -> Path:
        """The resolved data directory."""
        return self.paths.data_dir

    @property
    def model_dir(self) -> Path:
        """The resolved model store."""
        return self.paths.model_dir

    @property
    def roots(self) -> list[Path]:
        """Every root a client path may resolve into."""
        return [self.paths.data_dir, self.paths.model_dir, *self.paths.allowed_roots]

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the task store: database.url, else the SQLite file at paths.db_path."""
        return self.database.url or f"sqlite:///{self.paths.db_path}"

    @property
    def sqlite_path(self) -> Path | None:
        """The task store's SQLite file, wherever the URL points; None for PostgreSQL or an in-memory store."""
        return sqlite_file_of(self.database_url)

    @property
    def logs_dir(self) -> Path:
        """Where task and run workers write their log files."""
        return self.paths.data_dir / "logs"

    @property
    def private_paths(self) -> list[Path]:
        """Server-owned files and folders no client path may name: the SQLite store, its side files, task logs."""
        private = [self.logs_dir]
        db = self.sqlite_path
        if db is not None:
            private += [db, *(db.with_name(db.name + side) for side in SQLITE_SIDE_FILES)]
        return private

    def base_model_path(self) -> Path:
        """Resolve the configured base model to a directory."""
        name = self.models.base_model
        candidate = Path(name)
        if candidate.is_absolute():
            return candidate
        return self.model_dir / "base" / name

    def with_resolved_paths(self, anchor: Path) -> "Settings":
        """Return a copy whose relative paths are anchored at `anchor`."""

        def fix(p: Path) -> Path:
            return (p if p.is_absolute() else anchor / p).resolve()

        paths = self.paths.model_copy(
            update={
                "data_dir": fix(self.paths.data_dir),
                "model_dir": fix(self.paths.model_dir),
                "db_path": fix(self.paths.db_path),
                "allowed_roots": [fix(p) for p in self.paths.allowed_roots],
            }
        )
        return self.model_copy(update={"paths": paths})


SECRET_ENV = ("API_KEYS",)  # exact names; every WT_AUTH__* variable is secret too


def is_secret_env(name: str) -> bool:
    """Whether an environment variable carries API keys (no process the server starts may inherit it)."""
    return name.upper() in SECRET_ENV or name.upper().startswith("WT_AUTH__")


@contextmanager
def secrets_hidden() -> Iterator[None]:
    """Within this block the process environment holds no API keys: for starting a process that inherits it."""
    hidden = {name: os.environ.pop(name) for name in list(os.environ) if is_secret_env(name)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def load_settings(config_path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load config.yaml (or `config_path`), apply WT_* env vars and API_KEYS, then `overrides` ({"server": {...}})."""
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    raw: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    elif config_path:
        raise FileNotFoundError(f"Config file not found: {path}")
    settings = Settings(**raw)
    if os.environ.get("API_KEYS") is not None:  # comma-separated keys; overrides auth.api_keys of the file
        keys = [SecretStr(k.strip()) for k in os.environ["API_KEYS"].split(",") if k.strip()]
        settings = settings.model_copy(update={"auth": AuthSettings(api_keys=keys)})
    for section, values in (overrides or {}).items():
        current = getattr(settings, section)
        updated = current.model_validate({**current.model_dump(), **values})
        settings = settings.model_copy(update={section: updated})
    return settings.with_resolved_paths(path.resolve().parent)
