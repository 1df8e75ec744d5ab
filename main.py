"""Win-Train service: create_app(settings) and the command line (serve, prepare-model)."""

import argparse
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from controller import data, export, health, inference, openai_api, train
from controller import eval as eval_routes
from controller.errors import install_error_handlers
from service.data import DataService
from service.eval import EvalService
from service.export import ExportService
from service.inference import InferenceService
from service.jobs import JobRunner
from service.models import ModelCache, device_info
from service.tasks import TaskStore
from service.train.service import TrainService
from util.settings import VERSION, Settings, load_settings

log = logging.getLogger("wintrain")


def create_app(settings: Settings) -> FastAPI:
    """Build the FastAPI app; the lifespan creates the store, runner and services once."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        (settings.model_dir / "outputs").mkdir(parents=True, exist_ok=True)
        store = TaskStore(settings.paths.db_path)
        runner = JobRunner(settings, store)
        app.state.settings = settings
        app.state.store = store
        app.state.runner = runner
        app.state.data_service = DataService(settings)
        app.state.train_service = TrainService(settings, runner)
        app.state.export_service = ExportService(settings, runner)
        app.state.eval_service = EvalService(settings, runner)
        app.state.model_cache = ModelCache(settings.inference.cache_size)
        app.state.inference_service = InferenceService(settings, store, app.state.model_cache)
        app.state.device = device_info()
        app.state.started = time.monotonic()
        runner.start()
        log.info("serving with %d job slot(s) on %s", runner.slots, app.state.device["type"])
        try:
            yield
        finally:
            app.state.inference_service.close()
            runner.stop()
            store.engine.dispose()

    app = FastAPI(
        title="Win-Train",
        version=VERSION,
        description="Self-hosted LLM training management: data, training, inference and an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (health, data, train, inference, openai_api, export, eval_routes):
        app.include_router(module.router)
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `[serve|prepare-model] --config --host --port --log-level`."""
    parser = argparse.ArgumentParser(description="Win-Train training-management service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "prepare-model"])
    parser.add_argument("--config", type=Path, default=None, help="config file (default: ./config.yaml)")
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument("--log-level", default=None, help="override server.log_level")
    return parser.parse_args(argv)


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
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level.lower(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
