"""API-key authentication for /api/* and /v1/*: a bearer token or an X-API-Key header.

controller/guard.py checks the key from the headers before any body byte is read; the dependencies below repeat
the check on each route and declare the security schemes that /docs shows.
"""

import hashlib
import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from util.errors import AuthenticationError
from util.settings import Settings

bearer = HTTPBearer(auto_error=False, scheme_name="BearerKey", description="An API key as a bearer token.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKeyHeader")
MISSING_KEY = "An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
MISSING_TINKER_KEY = "An API key is required: pass api_key='tml-<your key>' to the Tinker client."
WRONG_KEY = "The API key is not valid."
TINKER_PREFIX = "tml-"  # the Tinker SDK insists on it; the server accepts a key with or without it


def key_digests(settings: Settings) -> list[bytes]:
    """SHA-256 digests of the configured keys; the server keeps only these."""
    return [hashlib.sha256(k.get_secret_value().encode()).digest() for k in settings.auth.api_keys]


def key_matches(given: str, digests: list[bytes]) -> bool:
    """Constant-time comparison of a presented key against every configured key's digest."""
    candidate = hashlib.sha256(given.encode()).digest()
    matched = False
    for digest in digests:  # no early exit: the time does not reveal which key (or whether any) matched
        matched |= hmac.compare_digest(candidate, digest)
    return matched


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <token>` header (None for another scheme), as HTTPBearer reads it."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_key(given: str | None, digests: list[bytes], tinker: bool = False) -> None:
    """Raise AuthenticationError unless no keys are configured or `given` is one (`tml-`-prefixed too if tinker)."""
    if not digests:
        return
    if not given:
        raise AuthenticationError(MISSING_TINKER_KEY if tinker else MISSING_KEY)
    if key_matches(given, digests):
        return
    if tinker and given.startswith(TINKER_PREFIX) and key_matches(given[len(TINKER_PREFIX) :], digests):
        return
    raise AuthenticationError(WRONG_KEY)


def presented_key(authorization: str | None, x_api_key: str | None, tinker: bool = False) -> str | None:
    """The key a request presents: the bearer token first, or for the Tinker routes the X-API-Key header first."""
    token = bearer_token(authorization)
    if tinker:
        return x_api_key or token
    return token or x_api_key


def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008 - FastAPI's idiom
    header_key: str | None = Security(api_key_header),
) -> None:
    """Let the request through when no keys are configured or it carries a valid one; else 401."""
    given = credentials.credentials if credentials is not None else header_key
    check_key(given, request.app.state.api_key_digests)
