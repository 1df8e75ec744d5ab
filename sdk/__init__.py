"""Python SDK of the Win-Train service: `from sdk import TuningClient`."""

from sdk.client import TuningClient
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
    "NotFoundError",
    "PermissionDeniedError",
    "TuningClient",
    "WinTrainError",
]
