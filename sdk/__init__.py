"""Python SDK of the Win-Train service: `from sdk import TuningClient`."""

from importlib.metadata import PackageNotFoundError, version

from sdk.client import JobFuture, TrainingRun, TuningClient
from sdk.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RunJobFailedError,
    TooManyRunsError,
    WinTrainError,
)
from sdk.job import Job


def _version() -> str:
    """The installed distribution's version: the SDK alone (wintrain-sdk) or the whole project (win-train)."""
    for dist in ("wintrain-sdk", "win-train"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "0.0.0+unknown"


__version__ = _version()

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "AuthenticationError",
    "ConflictError",
    "InvalidRequestError",
    "Job",
    "JobFailedError",
    "JobFuture",
    "NotFoundError",
    "PermissionDeniedError",
    "RunJobFailedError",
    "TooManyRunsError",
    "TrainingRun",
    "TuningClient",
    "WinTrainError",
]
