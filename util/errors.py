"""Domain errors raised by services and mapped to HTTP responses in one handler."""

from collections.abc import Sequence
from typing import Any


class AppError(Exception):
    """Base class for errors a client can act on."""

    status_code: int = 400
    error_type: str = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, details: Any = None) -> None:
        """Store a readable message and optional structured details."""
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInputError(AppError):
    """The request is well-formed but its content is unusable."""

    status_code = 422
    error_type = "invalid_input"


class NotFoundError(AppError):
    """A referenced task, file or model does not exist."""

    status_code = 404
    error_type = "not_found"


class ConflictError(AppError):
    """The request conflicts with the current state (e.g. cancelling a finished task)."""

    status_code = 409
    error_type = "conflict"


class ForbiddenPathError(AppError):
    """A client path resolves outside the configured roots."""

    status_code = 403
    error_type = "forbidden_path"


class AuthenticationError(AppError):
    """A missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}


def validation_message(errors: Sequence[Any]) -> str:
    """Summarise pydantic errors as 'field: problem; ...' (request locations like 'body' left out)."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class UnsupportedMediaTypeError(AppError):
    """A request body in a format the route does not read."""

    status_code = 415
    error_type = "unsupported_media_type"


class BadRequestError(AppError):
    """A request the OpenAI-compatible API refuses with 400, naming the parameter (OpenAI's `param`)."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, details: Any = None) -> None:
        """Store the message, the offending parameter and a machine-readable code."""
        super().__init__(message, details)
        self.param = param
        self.code = code


class PermissionDeniedError(AppError):
    """An action the caller may not take on this object (e.g. deleting a base model)."""

    status_code = 403
    error_type = "permission_error"


class OverloadedError(AppError):
    """The server is at capacity; the client should retry after a pause."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, retry_after: int = 1, details: Any = None) -> None:
        """Store the message and the Retry-After seconds."""
        super().__init__(message, details)
        self.headers = {"Retry-After": str(retry_after)}


class InvalidOutputError(AppError):
    """The model's answer does not satisfy what the request required (e.g. a JSON object)."""

    status_code = 422
    error_type = "invalid_output"


class PayloadTooLargeError(AppError):
    """A request body, upload or decompressed body over its configured size limit."""

    status_code = 413
    error_type = "payload_too_large"

    def __init__(self, message: str, param: str | None = None, details: Any = None) -> None:
        """Store the message and, under /v1, the parameter at fault (OpenAI's `param`)."""
        super().__init__(message, details)
        self.param = param
