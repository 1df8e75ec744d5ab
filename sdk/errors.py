"""Typed errors raised by the SDK, one per kind of failure the server reports."""

from typing import Any


class WinTrainError(Exception):
    """Base class of every SDK error."""


class APIConnectionError(WinTrainError):
    """The server could not be reached (refused, timed out, DNS)."""


class APIStatusError(WinTrainError):
    """The server answered with an error status; carries its error body."""

    def __init__(self, status_code: int, error_type: str, message: str, details: Any = None) -> None:
        """Keep the status and the server's {"error": {type, message, details}}."""
        super().__init__(f"{status_code} {error_type}: {message}")
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.details = details


class AuthenticationError(APIStatusError):
    """401: a missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: a path outside the server's allowed roots, or another refusal."""


class NotFoundError(APIStatusError):
    """404: no such task, file or model."""


class ConflictError(APIStatusError):
    """409: the request conflicts with the current state."""


class InvalidRequestError(APIStatusError):
    """400 or 422: the request is invalid."""


class APIError(APIStatusError):
    """5xx, or any other error status."""


class JobFailedError(WinTrainError):
    """A waited-on job ended failed or cancelled."""

    def __init__(self, job: Any) -> None:
        """Keep the final job."""
        super().__init__(f"job {job.id} {job.status}: {job.error or ''}".strip())
        self.job = job


class RunJobFailedError(WinTrainError):
    """A low-level training job (forward_backward, sample, ...) failed on the run's worker."""

    def __init__(self, job: dict[str, Any]) -> None:
        """Keep the failed job."""
        super().__init__(f"{job.get('kind')} job {job.get('id')} failed: {job.get('error')}")
        self.job = job


class TooManyRunsError(APIStatusError):
    """429: the server's limit of live training runs is reached."""


OVERWRITE_HINT = " (in the SDK: pass overwrite=True)"

STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    429: TooManyRunsError,
}


def error_for(status_code: int, body: Any) -> APIStatusError:
    """The typed error for a status code and the server's error body."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    cls = STATUS_ERRORS.get(status_code, APIError)
    message = error.get("message") or (str(body)[:500] if body else "no error message")
    if status_code == 409 and "overwrite" in message:  # the server names its JSON field; say the SDK's argument
        message += OVERWRITE_HINT
    return cls(status_code, error.get("type") or "error", message, error.get("details"))
