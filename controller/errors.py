"""One handler that turns every error into {"error": {"type", "message", "details"}}."""

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import STORE_ERRORS, store_error_text
from util.errors import AppError, validation_message

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_SECONDS = 5
DISK_FULL = {
    errno.ENOSPC: "The server's disk is full (no space left on device), so the request could not be completed. "
    "Free disk space on the server, then retry.",
    errno.EDQUOT: "The server's disk quota is exhausted, so the request could not be completed. Free space in the "
    "server's quota, then retry.",
}


def error_response(
    status: int,
    type_: str,
    message: str,
    details: Any = None,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The single JSON error shape; under /v1 it also carries OpenAI's `code` and `param` keys."""
    error: dict[str, Any] = {"type": type_, "message": message, "details": jsonable_encoder(details)}
    if request is not None and request.url.path.startswith("/v1/"):
        error.update(code=code or type_, param=param)
    return JSONResponse(status_code=status, content={"error": error}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on an app."""

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        code, param = getattr(exc, "code", None), getattr(exc, "param", None)
        return error_response(
            exc.status_code, exc.error_type, exc.message, exc.details, request, exc.headers, code, param
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return error_response(422, "validation_error", validation_message(errors), errors, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no route matched: say which, and the usual cause
            message = f"No route {request.method} {request.url.path}."
            if request.url.path.endswith("/") or "//" in request.url.path:
                message += " An id in the path is empty; was a shell variable such as $TASK_ID left unset?"
            message += " /docs lists the routes."
        return error_response(exc.status_code, type_, message, request=request)

    async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The database is down, restarting or locked past its timeout: the request can be retried as is. The
        # driver's text (SQL, parameters, server address) stays in the log.
        log.warning("task store unavailable: %s", store_error_text(exc))
        return error_response(
            503,
            "store_unavailable",
            f"The task store (database) is not answering; it may be down or restarting. Retry in"
            f" {STORE_RETRY_AFTER_SECONDS} s.",
            {"reason": type(getattr(exc, "orig", None) or exc).__name__},
            request,
            {"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
        )

    for store_error in STORE_ERRORS:
        app.add_exception_handler(store_error, _store_unavailable)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in DISK_FULL:  # a write ran out of space: say so (507), never which path
            log.error("%s %s: %s", request.method, request.url.path, exc)
            return error_response(507, "insufficient_storage", DISK_FULL[exc.errno], {"errno": exc.errno}, request)
        return _internal_error(request, exc)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # controller/guard.py refuses deeply nested JSON before parsing; other documents (YAML block nesting)
        # reach a parser's recursion limit instead, which is still the client's input and not a server fault.
        log.warning("%s %s: recursion limit reached", request.method, request.url.path, exc_info=exc)
        return error_response(422, "invalid_input", "The request is nested too deeply to be read.", request=request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request, exc)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A 500 that names the exception's type only: its text (paths, SQL, values) stays in the log."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    message = f"Internal server error ({type(exc).__name__}); the server log has the details."
    return error_response(500, "internal_error", message, {"exception": type(exc).__name__}, request)
