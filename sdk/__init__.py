"""Python SDK of the Win-Train service: `from sdk import TuningClient`."""

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
