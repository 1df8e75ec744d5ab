"""Win-Train service: create_app(settings) and the command line (serve, prepare-model)."""

import argparse
import ipaddress
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI

from controller import data, export, files, fine_tuning, health, inference, openai_api, runs, tinker, train
from controller import eval as eval_routes
from controller import ui as ui_routes
from controller.auth import key_digests, require_api_key
from controller.client_paths import ClientPaths
from controller.docs import install_offline_docs
from controller.errors import install_error_handlers
from controller.guard import RequestGuard
from controller.openapi import TAGS, error_responses, install_openapi
from service.data import DataService
from service.db import relocate_legacy_store
from service.engine import EngineConfig
from service.eval import EvalService
from service.export import ExportService
from service.fine_tuning.files import FileService
from service.fine_tuning.jobs import FineTuningService
from service.inference import InferenceService
from service.jobs import JobRunner
from service.models import ModelCache, device_info
from service.outputs import OutputFileService
from service.runs import RunService
from service.tasks import TaskStore
from service.tinker.api import TinkerService
from service.train.service import TrainService
from util.settings import PROJECT_ROOT, VERSION, Settings, load_settings

log = logging.getLogger("wintrain")
SETTINGS_ENV = "WT_SERVE_SETTINGS_JSON"
CONFIG_ENV = "WT_SERVE_CONFIG"


def create_app(settings: Settings) -> FastAPI:
    """Build the FastAPI app; the lifespan creates the store, runner and services once."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal settings  # where the task database really is, once an old install's has moved out of data/
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        (settings.model_dir / "outputs").mkdir(parents=True, exist_ok=True)
        if settings.database.url is None:  # an install whose database sits in the data dir: move it out first
            db_path = relocate_legacy_store(settings.paths.db_path, settings.data_dir)
            settings = settings.model_copy(update={"paths": settings.paths.model_copy(update={"db_path": db_path})})
        store = TaskStore(settings.database_url)
        store.stall_seconds = settings.jobs.stall_seconds  # the tasks it reads say whether they are stalled
        runner = JobRunner(settings, store)
        app.state.settings = settings
        app.state.api_key_digests = key_digests(settings)
        app.state.store = store
        app.state.runner = runner
        app.state.data_service = DataService(settings, store)
        app.state.train_service = TrainService(settings, runner)
        app.state.export_service = ExportService(settings, runner)
        app.state.eval_service = EvalService(settings, runner)
        app.state.run_service = RunService(settings, store)
        app.state.output_file_service = OutputFileService(settings, store)
        app.state.tinker_service = TinkerService(settings, app.state.run_service)
        app.state.model_cache = ModelCache(
            settings.inference.cache_size, EngineConfig.from_settings(settings.inference)
        )
        app.state.inference_service = InferenceService(settings, store, app.state.model_cache)
        app.state.file_service = FileService(settings, store, app.state.data_service)
        app.state.fine_tuning_service = FineTuningService(app.state.train_service, runner, app.state.file_service)
        app.state.device = device_info()
        app.state.started = time.monotonic()
        runner.start()
        app.state.run_service.start()
        log.info("serving with %d job slot(s) on %s", runner.slots, app.state.device["type"])
        try:
            yield
        finally:
            app.state.inference_service.close()
            app.state.run_service.stop()
            runner.stop()
            store.engine.dispose()

    app = FastAPI(
        title="Win-Train",
        version=VERSION,
        description="Self-hosted LLM training management: data, training, inference and an OpenAI-compatible API.",
        lifespan=lifespan,
        openapi_tags=TAGS,
        docs_url=None,  # served by install_offline_docs from vendored assets (no CDN)
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings)  # key, body size, JSON depth: before a body byte is read
    app.add_middleware(ClientPaths, settings=settings)  # responses show paths relative to their root
    install_offline_docs(app)
    ui_routes.install(app)  # /static, the dashboard pages at /ui (pages open; their data calls need a key)
    app.include_router(health.router)  # /health (like /docs) stays open
    for module in (data, train, inference, openai_api, fine_tuning, runs, export, eval_routes, files):
        app.include_router(module.router, dependencies=[Depends(require_api_key)], responses=error_responses(401))
    app.include_router(tinker.files_router)  # signed download links carry their own credential
    app.include_router(tinker.router, responses=error_responses(401))  # Tinker SDK routes (/api/v1), `tml-` keys too
    install_openapi(app)
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `[serve|prepare-model] --config --host --port --log-level`."""
    parser = argparse.ArgumentParser(description="Win-Train training-management service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "prepare-model"])
    parser.add_argument("--config", type=Path, default=None, help="config file (default: ./config.yaml)")
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument("--log-level", default=None, help="override server.log_level")
    parser.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback host with no API keys (the API is then open)"
    )
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python main.py`."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    server = {k: v for k, v in {"host": args.host, "port": args.port, "log_level": args.log_level}.items() if v}
    settings = load_settings(args.config, {"server": server})
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "prepare-model":
        from service.models import prepare_default_model

        out = settings.base_model_path()
        converted = prepare_default_model(out)
        print(f"{'converted' if converted else 'already prepared'}: {out}")
        return 0
    if not settings.auth.api_keys and not is_loopback(settings.server.host) and not args.insecure:
        print(
            f"Refusing to serve on {settings.server.host} with no API keys: anyone on the network could use the "
            "API. Set auth.api_keys in the config or API_KEYS in the environment, bind to 127.0.0.1, or pass "
            "--insecure to serve an open API anyway.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    target: Any
    if args.reload:  # uvicorn re-imports the app in a fresh process: hand it the settings through the env
        os.environ[SETTINGS_ENV] = settings.model_dump_json(exclude={"auth"})
        os.environ[CONFIG_ENV] = str(args.config or "")
        target = "main:create_app_from_env"
    else:
        target = create_app(settings)
    uvicorn.run(
        target,
        factory=args.reload,
        reload=args.reload,
        reload_dirs=[str(PROJECT_ROOT)] if args.reload else None,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level.lower(),
    )
    return 0


def create_app_from_env() -> FastAPI:
    """App factory for --reload: the serving process's settings; API keys re-read from the config and API_KEYS."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    auth = load_settings(Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None).auth
    return create_app(settings.model_copy(update={"auth": auth}))


if __name__ == "__main__":
    sys.exit(main())
