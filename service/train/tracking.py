"""Experiment tracking (TensorBoard, MLflow, offline Weights & Biases) through the Trainer's report_to."""

import importlib.util
import os
from pathlib import Path

from util.errors import InvalidInputError
from util.settings import Settings, Tracker

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


def trackers(requested: Tracker | list[Tracker] | None, default: Tracker | list[Tracker]) -> list[str]:
    """The trackers a run reports to: the request's, else the configured default; "none" is the empty list."""
    chosen = default if requested is None else requested
    names = [chosen] if isinstance(chosen, str) else list(chosen)
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_installed(names: list[str]) -> None:
    """Refuse trackers whose package is missing, before the task is queued."""
    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise InvalidInputError(
            f"report_to {missing} needs the package(s) {packages}, which are not installed on the server "
            f'(pip install {packages}), or choose report_to "tensorboard" or "none".',
            details={"missing": missing},
        )


def tracking_env(names: list[str], output_dir: Path, settings: Settings) -> dict[str, str]:
    """Environment the Trainer's tracker callbacks read, pointing every tracker into the run's output folder."""
    env: dict[str, str] = {}
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = str(output_dir / TENSORBOARD_DIR)
    if "mlflow" in names:
        uri = settings.train.mlflow_tracking_uri or (output_dir / MLFLOW_DIR).as_uri()
        env["MLFLOW_TRACKING_URI"] = uri
        env["MLFLOW_EXPERIMENT_NAME"] = settings.train.experiment_name
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only behind this switch; a local folder needs no database server
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in names:
        env.update(WANDB_MODE="offline", WANDB_DIR=str(output_dir), WANDB_PROJECT=settings.train.experiment_name)
    return env


def apply(names: list[str], output_dir: Path, settings: Settings) -> None:
    """Set the trackers' environment in this (task worker) process."""
    os.environ.update(tracking_env(names, output_dir, settings))
