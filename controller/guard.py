"""The request guard: an ASGI middleware that checks what it can before the app reads a request body.

In this order, for every HTTP request:
1. API key. /api/* and /v1/* need one (controller/auth.py; the Tinker routes under /api/v1 take it `tml-`-prefixed
   too, and Tinker's signed download links carry their own credential). A missing or wrong key gets 401 from the
   headers alone: not a byte of the body is read, whatever its size or content.
2. Body size. A Content-Length over the route's limit gets 413 at once; a chunked body is counted as it streams
   and gets 413 once it passes the limit. The limit is server.max_body_mb, except on the two upload routes
   (POST /api/data/upload, POST /v1/files), where it is data.max_upload_mb plus UPLOAD_OVERHEAD for the multipart
   framing and form fields (or server.max_body_mb, if larger). The upload routes then hold the file itself to
   data.max_upload_mb exactly, as it streams to disk (controller/uploads.py).
3. JSON nesting. A body that may be read as JSON (any media type but form data, protobuf, octet-stream, or a
   Content-Encoding; never on the upload routes) is buffered (it is at most the body limit) and scanned for [ and
   { outside strings: deeper than server.max_json_depth gets 422 before any parser sees it, where Python's parser
   would otherwise hit its recursion limit (a 500).

An answer sent before the whole body was read (the guard's, or the app's: an upload refused at its cap) carries
`Connection: close`, so the client stops sending and the unread rest is never taken for the next request.
"""

import json
import re
from typing import Any

import anyio
import numpy as np
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.auth import check_key, key_digests, presented_key
from controller.errors import error_response
from util.errors import AuthenticationError
from util.settings import Settings

MIB = 1024 * 1024
UPLOAD_ROUTES = {("POST", "/api/data/upload"), ("POST", "/v1/files")}
UPLOAD_OVERHEAD = MIB  # multipart boundaries, part headers and the small form fields around the file
SIGNED_DOWNLOAD = re.compile(r"/api/v1/files/[^/]+")  # tinker.files_router: the signed token is the credential
NOT_JSON = ("multipart/", "application/x-www-form-urlencoded", "application/x-protobuf", "application/octet-stream")
SCAN_CHUNK = 256 * 1024  # bytes per vectorised step of the nesting scan (small arrays: fewer page faults)
SCAN_IN_THREAD = MIB  # larger bodies are scanned in a worker thread, off the event loop


class BodyTooLarge(Exception):
    """Raised from the guard's receive once a streamed body passes its limit (the guard then answers 413)."""


def auth_realm(method: str, path: str) -> str | None:
    """Which key check a request needs: 'tinker' (/api/v1/*), 'api' (other /api/*, /v1/*), or None (open)."""
    if path == "/api/v1" or path.startswith("/api/v1/"):
        if method in ("GET", "HEAD") and SIGNED_DOWNLOAD.fullmatch(path):
            return None
        return "tinker"
    if path in ("/api", "/v1") or path.startswith(("/api/", "/v1/")):
        return "api"
    return None


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether JSON text nests [ and { (outside strings) deeper than `max_depth`.

    Exact for valid JSON, and for every prefix a parser accepts before it fails, so nothing deeper ever reaches
    a parser. Vectorised (about a second for 64 MB of brackets); a body with few brackets is answered by a count.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):  # UTF-16/32 (json.loads accepts them): scan the same text as UTF-8
        try:
            body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeError:
            return False  # not text in that encoding: the parser refuses it before nesting anything
    # Escapes: drop escaped backslashes first, then escaped quotes; every quote left opens or closes a string.
    body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = np.frombuffer(body, dtype=np.uint8)
    depth, in_string = 0, 0
    for start in range(0, len(data), SCAN_CHUNK):
        chunk = data[start : start + SCAN_CHUNK]
        # Parity of the quotes so far: 1 inside a string (uint8 sums wrap at 256, which keeps the parity).
        inside = (np.cumsum(chunk == ord('"'), dtype=np.uint8) + in_string) & 1
        step = (chunk == ord("[")).astype(np.int32) + (chunk == ord("{"))
        step -= (chunk == ord("]")).astype(np.int32) + (chunk == ord("}"))
        step = step[(step != 0) & (inside == 0)]
        if step.size:
            levels = np.cumsum(step) + depth
            if int(levels.max()) > max_depth:
                return True
            depth = int(levels[-1])
        in_string = int(inside[-1])
    return False


class RequestGuard:
    """ASGI middleware: API key, body size and JSON nesting, checked before the app reads the body (see above)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        """Wrap `app`; the limits come from `settings` (server.max_body_mb, server.max_json_depth, data.*)."""
        self.app = app
        self.settings = settings
        self.max_body = settings.server.max_body_mb * MIB
        self.upload_limit = max(self.max_body, settings.data.max_upload_mb * MIB + UPLOAD_OVERHEAD)
        self.max_depth = settings.server.max_json_depth
        self._digests: list[bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check one request, then hand it to the app (or answer 401, 413 or 422 in its place)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        realm = auth_realm(method, path)
        if realm is not None:
            tinker = realm == "tinker"
            given = presented_key(headers.get("authorization"), headers.get("x-api-key"), tinker)
            try:
                check_key(given, self._key_digests(scope), tinker)
            except AuthenticationError as exc:
                await _refuse(scope, send, 401, exc.error_type, exc.message, None, exc.headers, close=has_body)
                return
        upload = (method, path) in UPLOAD_ROUTES
        limit = self.upload_limit if upload else self.max_body
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            await self._too_large(scope, send, upload, close=True)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        if self._may_be_json(headers) and not upload:  # the upload routes read multipart only: never buffered
            await self._buffered(scope, receive, send, limit)
            return
        await self._counted(scope, receive, send, limit, upload)

    def _key_digests(self, scope: Scope) -> list[bytes]:
        """The configured keys' digests, as the app's lifespan stored them (from the settings before that)."""
        state = getattr(scope.get("app"), "state", None)
        digests = getattr(state, "api_key_digests", None)
        if digests is None:
            if self._digests is None:
                self._digests = key_digests(self.settings)
            digests = self._digests
        return digests

    @staticmethod
    def _may_be_json(headers: Headers) -> bool:
        """Whether some route could parse this body as JSON (FastAPI does so even without a Content-Type)."""
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        return not media.startswith(NOT_JSON) and "content-encoding" not in headers

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read the whole body (up to `limit`), refuse it if too deep, else replay it to the app."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, send, False, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if len(body) > SCAN_IN_THREAD:
            too_deep = await anyio.to_thread.run_sync(json_too_deep, body, self.max_depth)
        else:
            too_deep = json_too_deep(body, self.max_depth)
        if too_deep:
            message = (
                f"The JSON body is nested more than {self.max_depth} levels deep ([ and {{), the most this server "
                "reads (server.max_json_depth)."
            )
            await _refuse(scope, send, 422, "invalid_input", message, {"max_json_depth": self.max_depth})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, upload: bool) -> None:
        """Pass the body through as it streams, answering 413 instead of the app once it passes `limit`.

        An answer the app gives before the body's end (an upload refused at its cap or for its name) closes the
        connection, so the client stops sending what nobody reads.
        """
        size = 0
        over = False
        ended = False
        started = False

        async def counting_receive() -> Message:
            nonlocal size, over, ended
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    over = True
                    raise BodyTooLarge
                ended = not message.get("more_body", False)
            else:
                ended = True  # http.disconnect
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app answers to the cut-off body, the client gets the 413 below
            if message["type"] == "http.response.start":
                started = True
                if not ended:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._too_large(scope, send, upload, close=True)

    async def _too_large(self, scope: Scope, send: Send, upload: bool, close: bool) -> None:
        """Answer 413, naming the limit that applies."""
        server_mb = self.settings.server.max_body_mb
        if upload and self.upload_limit > self.max_body:
            upload_mb = self.settings.data.max_upload_mb
            message = f"The upload exceeds the {upload_mb} MB limit (data.max_upload_mb)."
            details: dict[str, Any] = {"max_upload_mb": upload_mb}
        else:
            message = f"The request body exceeds the {server_mb} MB limit (server.max_body_mb)."
            details = {"max_body_mb": server_mb}
        await _refuse(scope, send, 413, "payload_too_large", message, details, close=close)


def _content_length(headers: Headers) -> int | None:
    """The declared body size, or None (absent or unreadable: the server refuses the latter itself)."""
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _refuse(
    scope: Scope,
    send: Send,
    status: int,
    type_: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> None:
    """Send an error in the house shape without reading the request body."""
    extra = dict(headers or {})
    if close:
        extra["Connection"] = "close"
    response = error_response(status, type_, message, details, Request(scope), extra)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    """A receive for responses sent in the app's place: they never read the request."""
    return {"type": "http.disconnect"}
