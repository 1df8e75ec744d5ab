"""Health, settings precedence, and the CLI's flags."""

from conftest import TINY_NAME
from main import parse_args
from util.settings import PROJECT_ROOT, load_settings


def test_health_reports_service_state(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["uptime_seconds"] >= 0
    assert body["device"]["type"] in {"cpu", "cuda"}
    assert body["base_model"] == TINY_NAME
    assert body["jobs"] == {"active": 0, "queued": 0, "total": 0, "slots": 1}


def test_docs_and_openapi_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/data/validate",
        "/api/data/process",
        "/api/data/upload",
        "/api/train/start",
        "/api/train/status/{task_id}",
        "/api/train/tasks",
        "/api/train/cancel/{task_id}",
        "/api/train/logs/{task_id}",
        "/api/train/events/{task_id}",
        "/health",
    ):
        assert path in paths


def test_unknown_route_uses_error_shape(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


def test_env_overrides_file_and_flags_override_env(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9100\n  host: 0.0.0.0\npaths:\n  data_dir: d\n", encoding="utf-8")
    s = load_settings(cfg)
    assert (s.server.port, s.server.host, s.data_dir) == (9100, "0.0.0.0", tmp_path / "d")
    monkeypatch.setenv("WT_SERVER__PORT", "9200")
    monkeypatch.setenv("WT_JOBS__MAX_CONCURRENT_JOBS", "3")
    s = load_settings(cfg)
    assert (s.server.port, s.server.host, s.jobs.max_concurrent_jobs) == (9200, "0.0.0.0", 3)
    s = load_settings(cfg, {"server": {"port": 9300}})
    assert s.server.port == 9300


def test_default_config_file_matches_defaults():
    s = load_settings(PROJECT_ROOT / "config.yaml")
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8801)
    assert s.base_model_path() == PROJECT_ROOT / "model" / "base" / "SmolLM2-135M-Instruct"
    assert s.paths.db_path == PROJECT_ROOT / "state" / "tasks.db"
    assert not any(s.paths.db_path.is_relative_to(root) for root in s.roots)  # clients never reach the store


def test_cli_flags():
    args = parse_args(["--config", "x.yaml", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.command, str(args.config), args.host, args.port) == ("serve", "x.yaml", "0.0.0.0", 9000)
    assert parse_args(["prepare-model"]).command == "prepare-model"
