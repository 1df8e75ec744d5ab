"""API keys: every /api and /v1 route refuses a missing or wrong key; /health and /docs stay open."""

import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from conftest import free_port
from controller.auth import key_digests, key_matches
from main import create_app, is_loopback
from util.settings import PROJECT_ROOT, AuthSettings, load_settings

KEY = "s3cret-key"


@pytest.fixture
def secured(settings):
    secured_settings = settings.model_copy(update={"auth": AuthSettings(api_keys=[SecretStr(KEY), SecretStr("k2")])})
    with TestClient(create_app(secured_settings)) as c:
        yield c


def _protected_routes(client) -> list[tuple[str, str]]:
    """(method, path) of every /api and /v1 route, path parameters filled in."""
    routes = []
    for path, ops in client.get("/openapi.json").json()["paths"].items():
        if path == "/api/v1/files/{token}":  # Tinker's signed download links: the signed token is the credential
            continue
        if path.startswith(("/api/", "/v1/")):
            filled = re.sub(r"\{[a-z_]+\}", "0" * 32, path)
            routes += [(method.upper(), filled) for method in ops]
    return routes


def test_every_protected_route_needs_a_valid_key(secured):
    routes = _protected_routes(secured)
    routers = {path.split("/")[2] if path.startswith("/api/") else "v1" for _, path in routes}
    assert routers >= {"data", "train", "inference", "eval", "export", "v1"}
    assert ("POST", "/v1/runs/" + "0" * 32 + "/forward_backward") in routes
    for method, path in routes:
        missing = secured.request(method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = secured.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, (method, path)
        assert "not valid" in wrong.json()["error"]["message"]
        assert secured.request(method, path, headers={"X-API-Key": "nope"}).status_code == 401


def test_signed_download_links_refuse_an_unsigned_token(secured):
    assert secured.get("/api/v1/files/" + "0" * 32).status_code == 404


def test_valid_key_by_bearer_or_header_passes(secured):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"X-API-Key": "k2"}):
        assert secured.get("/api/train/tasks", headers=headers).status_code == 200
        assert secured.get("/v1/models", headers=headers).status_code == 200


def test_health_and_docs_stay_open(secured):
    assert secured.get("/health").status_code == 200
    assert secured.get("/docs").status_code == 200
    assert secured.get("/openapi.json").status_code == 200


def test_openapi_declares_the_security_schemes(secured):
    spec = secured.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["BearerKey"] == {"type": "http", "scheme": "bearer", "description": "An API key as a bearer token."}
    assert schemes["ApiKeyHeader"]["in"] == "header" and schemes["ApiKeyHeader"]["name"] == "X-API-Key"
    assert {"BearerKey": []} in spec["paths"]["/api/train/start"]["post"]["security"]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_open_mode_without_keys(client):
    assert client.get("/api/train/tasks").status_code == 200


def test_key_comparison_and_storage():
    settings = load_settings(None)
    digests = key_digests(settings.model_copy(update={"auth": AuthSettings(api_keys=[SecretStr("a"), SecretStr("b")])}))
    assert key_matches("b", digests) and not key_matches("c", digests) and not key_matches("", digests)
    assert all(len(d) == 32 for d in digests)
    dumped = settings.model_copy(update={"auth": AuthSettings(api_keys=[SecretStr("a-key")])}).model_dump_json()
    assert "a-key" not in dumped


def test_api_keys_env_overrides_the_file(monkeypatch):
    monkeypatch.setenv("API_KEYS", " one, two ,")
    keys = [k.get_secret_value() for k in load_settings(None).auth.api_keys]
    assert keys == ["one", "two"]


def test_refuses_open_api_on_a_non_loopback_host(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    config = tmp_path / "c.yaml"
    config.write_text(f"paths:\n  data_dir: {tmp_path / 'd'}\n  db_path: {tmp_path / 't.db'}\n")
    cmd = [sys.executable, "main.py", "--config", str(config), "--host", "0.0.0.0", "--port", str(free_port())]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env={"PATH": ""})
    assert result.returncode == 2
    assert "Refusing to serve on 0.0.0.0" in result.stderr and "--insecure" in result.stderr
