"""API-key authentication for /api/* and /v1/*: a bearer token or an X-API-Key header."""

import hashlib
import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from util.errors import AuthenticationError
from util.settings import Settings

bearer = HTTPBearer(auto_error=False, scheme_name="BearerKey", description="An API key as a bearer token.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKeyHeader")


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


def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008 - FastAPI's idiom
    header_key: str | None = Security(api_key_header),
) -> None:
    """Let the request through when no keys are configured or it carries a valid one; else 401."""
    digests: list[bytes] = request.app.state.api_key_digests
    if not digests:
        return
    given = credentials.credentials if credentials is not None else header_key
    if not given:
        raise AuthenticationError("An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")
    if not key_matches(given, digests):
        raise AuthenticationError("The API key is not valid.")
