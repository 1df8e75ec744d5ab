"""Request bodies: the key and the size are checked before a body byte is read, uploads are capped as they stream,
deep JSON and zstd bombs are refused, and disk-full or unexpected errors answer without server paths."""

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
import zstandard
from fastapi.testclient import TestClient
from pydantic import SecretStr

from conftest import TINY_NAME, free_port, start_server, stop_server
from controller.guard import json_too_deep
from main import create_app
from util.settings import PROJECT_ROOT, AuthSettings

KEY = "limits-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 1024 * 1024
BODY_MB = 1  # server.max_body_mb of these servers
UPLOAD_MB = 2  # data.max_upload_mb of these servers
LIMITS = {"server": {"max_body_mb": BODY_MB}, "data": {"max_upload_mb": UPLOAD_MB}, "auth": {"api_keys": [KEY]}}
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in Python's json parser
DEEP_ROUTES = ["/api/train/start", "/api/v1/create_model", "/api/v1/optim_step", "/api/v1/asample"]
DEEP_ROUTES += ["/api/v1/retrieve_future"]
CHAT = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
BOUNDARY = "limits-boundary"


# -- a raw HTTP/1.1 client: the body is sent in a thread while the answer is read, so an early answer is seen ----


@dataclass
class Reply:
    """An HTTP answer read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    seconds: float


def exchange(url: str, head: str, chunks: Iterable[bytes] = (), timeout: float = 20.0) -> Reply:
    """Send `head` and then `chunks` (from a thread, stopping at the first send error) and read one answer."""
    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port), timeout=timeout)
    started = time.monotonic()

    def feed() -> None:
        try:
            sock.sendall(head.encode())
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: the rest is not wanted

    sender = threading.Thread(target=feed, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"connection closed before an answer: {data!r}"
            data += piece
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(rest) < int(headers.get("content-length", 0)):
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        seconds = time.monotonic() - started
    finally:
        sock.close()
    return Reply(int(lines[0].split()[1]), headers, json.loads(rest), seconds)


def request_head(method: str, path: str, headers: dict[str, str]) -> str:
    """The request line and headers of a request to a test server."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(total: int, piece: int = 64 * 1024, fill: bytes = b" ") -> Iterator[bytes]:
    """`total` bytes in chunked transfer encoding."""
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield f"{n:x}\r\n".encode() + fill * n + b"\r\n"
        sent += n
    yield b"0\r\n\r\n"


def multipart(name: str, size: int, fields: dict[str, str] | None = None) -> tuple[bytes, Iterator[bytes], bytes]:
    """(start, content chunks, end) of a multipart body whose file part holds `size` bytes of JSONL."""
    start = "".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in (fields or {}).items()
    )
    start += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'
    line = CHAT * (64 * 1024 // len(CHAT))

    def content() -> Iterator[bytes]:
        left = size
        while left > 0:
            yield line[:left]
            left -= len(line)

    return start.encode(), content(), f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def leftovers(folder: Path) -> list[str]:
    """Every file under a folder, hidden ones (temporary uploads) included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- a live server with small limits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[tuple[str, Path]]:
    """A real server (uvicorn) with an API key, server.max_body_mb 1 and data.max_upload_mb 2; (url, data dir)."""
    work = tmp_path_factory.mktemp("limits")
    url, proc = start_server(work, tiny_model_root, LIMITS)
    yield url, work / "data"
    stop_server(proc)


@pytest.mark.parametrize("path", ["/api/data/upload", "/v1/files", "/api/v1/create_model", "/api/train/start"])
def test_no_key_is_401_from_the_headers_alone(live, path):
    url, data_dir = live
    head = request_head("POST", path, {"Content-Length": str(600 * MIB), **MULTIPART})
    reply = exchange(url, head, [b"x" * 1024])  # 1 KB of the 600 MB it claims: the server must not wait for more
    assert reply.status == 401, reply.body
    assert reply.body["error"]["type"] == "authentication_error"
    assert reply.headers["www-authenticate"] == "Bearer"
    assert reply.headers["connection"] == "close"  # the unread body is never taken for the next request
    assert reply.seconds < 10
    assert leftovers(data_dir / "uploads") == []


def test_wrong_key_with_a_chunked_body_is_401_without_reading_it(live):
    url, _ = live
    head = request_head("POST", "/api/data/upload", {"Transfer-Encoding": "chunked", "X-API-Key": "nope", **MULTIPART})
    reply = exchange(url, head, chunked(64 * MIB))
    assert reply.status == 401 and "not valid" in reply.body["error"]["message"]


def test_content_length_over_the_limit_is_413_before_the_body(live):
    url, _ = live
    head = request_head("POST", "/api/train/start", {"Content-Length": str(2 * MIB), **AUTH})
    reply = exchange(url, head)  # nothing of the body is sent
    assert reply.status == 413, reply.body
    assert reply.body["error"]["type"] == "payload_too_large"
    assert "1 MB limit (server.max_body_mb)" in reply.body["error"]["message"]
    assert reply.headers["connection"] == "close"
    head = request_head("POST", "/api/data/upload", {"Content-Length": str(600 * MIB), **AUTH, **MULTIPART})
    reply = exchange(url, head)
    assert reply.status == 413 and "2 MB limit (data.max_upload_mb)" in reply.body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "media"),
    [("/api/train/start", "application/json"), ("/api/v1/forward_backward", "application/x-protobuf")],
)
def test_chunked_body_over_the_limit_is_413_once_it_passes(live, path, media):
    url, _ = live
    head = request_head("POST", path, {"Transfer-Encoding": "chunked", "Content-Type": media, **AUTH})
    reply = exchange(url, head, chunked(16 * MIB))
    assert reply.status == 413, reply.body
    assert "1 MB limit (server.max_body_mb)" in reply.body["error"]["message"]


def test_a_body_within_the_limit_still_passes(live):
    url, _ = live
    padding = " " * (BODY_MB * MIB - 200)  # just under the limit, sent chunked
    body = json.dumps({"strategy": "lora", "dataset_path": "missing.jsonl", "config": {"max_steps": 1}}) + padding
    head = request_head("POST", "/api/train/start", {"Transfer-Encoding": "chunked", **AUTH})
    reply = exchange(url, head, [f"{len(body):x}\r\n{body}\r\n0\r\n\r\n".encode()])
    assert reply.status == 404, reply.body  # read and parsed: the dataset does not exist


@pytest.mark.parametrize(("path", "fields"), [("/api/data/upload", {}), ("/v1/files", {"purpose": "fine-tune"})])
@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_upload_over_its_cap_stops_while_streaming_and_leaves_nothing(live, path, fields, transfer):
    url, data_dir = live
    size = int(2.5 * MIB) if transfer == "content-length" else 64 * MIB  # the first passes the request guard
    start, content, end = multipart("big.jsonl", size, fields)
    if transfer == "content-length":
        headers = {"Content-Length": str(len(start) + size + len(end)), **AUTH, **MULTIPART}
        chunks: Iterable[bytes] = [start, *content, end]
    else:
        headers = {"Transfer-Encoding": "chunked", **AUTH, **MULTIPART}
        chunks = (f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in [start, *content, end, b""])
    reply = exchange(url, request_head("POST", path, headers), chunks)
    assert reply.status == 413, reply.body
    assert "2 MB limit (data.max_upload_mb)" in reply.body["error"]["message"]
    time.sleep(0.5)  # the temporary file is removed as the request ends
    assert leftovers(data_dir / "uploads") == [] and leftovers(data_dir / "files") == []


def test_uploads_under_the_cap_stream_through(live):
    url, data_dir = live
    client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
    size = UPLOAD_MB * MIB - len(CHAT)  # just under the cap (the body's framing is allowed on top)
    content = CHAT * (size // len(CHAT))
    r = client.post("/api/data/upload", files={"file": ("fits.jsonl", content)})
    assert r.status_code == 201, r.text
    assert (data_dir / "uploads" / "fits.jsonl").read_bytes() == content
    # overwrite sent after the file part: honoured all the same
    start, chunks, end = multipart("fits.jsonl", len(CHAT))
    tail = f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue'.encode()
    r = client.post("/api/data/upload", content=start + b"".join(chunks) + tail + end, headers=MULTIPART)
    assert r.status_code == 201, r.text
    assert (data_dir / "uploads" / "fits.jsonl").read_bytes() == CHAT
    r = client.post("/v1/files", files={"file": ("chat.jsonl", CHAT * 3)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == 3 * len(CHAT) and r.json()["filename"] == "chat.jsonl"
    assert not [p for p in leftovers(data_dir) if Path(p).name.startswith(".upload-")]


def test_zstd_bomb_is_413_without_inflating_it(live):
    url, _ = live
    # 512 MB of zeros in about 16 KB, the frame declaring its size (one-shot decompression would allocate it all)
    compressor = zstandard.ZstdCompressor(level=3).compressobj(size=512 * MIB)
    zeros = bytes(MIB)
    bomb = b"".join(compressor.compress(zeros) for _ in range(512)) + compressor.flush()
    assert len(bomb) < 64 * 1024
    headers = {"X-API-Key": f"tml-{KEY}", "Content-Encoding": "zstd", "Content-Type": "application/x-protobuf"}
    r = httpx.post(f"{url}/api/v1/forward_backward", content=bomb, headers=headers, timeout=30)
    assert r.status_code == 413, r.text
    assert "decompresses to more than the 1 MB limit" in r.json()["error"]["message"]
    small = zstandard.ZstdCompressor().compress(b"\xff\x00garbage")  # a small body still decompresses (then 422)
    r = httpx.post(f"{url}/api/v1/forward_backward", content=small, headers=headers, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_input"


# -- the same checks through the app (TestClient) -------------------------------------------------------------


@pytest.fixture
def secured(settings) -> Iterator[TestClient]:
    """An app with an API key and the small limits."""
    limited = settings.model_copy(
        update={
            "auth": AuthSettings(api_keys=[SecretStr(KEY)]),
            "server": settings.server.model_copy(update={"max_body_mb": BODY_MB}),
            "data": settings.data.model_copy(update={"max_upload_mb": UPLOAD_MB}),
        }
    )
    with TestClient(create_app(limited)) as c:
        c.app.state.runner.stop()  # no task runs: the scheduler stays idle
        yield c


@pytest.mark.parametrize(
    "path", ["/api/train/start", "/api/data/process", "/v1/chat/completions", "/v1/runs", "/api/v1/create_model"]
)
def test_malformed_json_without_a_key_is_401_not_422(secured, path):
    r = secured.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", DEEP_ROUTES)
@pytest.mark.parametrize("deep", [DEEP, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_deeply_nested_json_is_422_on_every_route(secured, path, deep):
    headers = {**AUTH, "X-API-Key": f"tml-{KEY}", "Content-Type": "application/json"}
    r = secured.post(path, content=deep, headers=headers)
    assert r.status_code == 422, r.text[:500]
    assert "max_json_depth" in r.json()["error"]["message"]


def test_deep_json_without_a_content_type_or_as_text_is_422_too(secured):
    for headers in ({}, {"Content-Type": "text/plain"}):
        r = secured.post("/api/v1/create_model", content=DEEP, headers={"X-API-Key": KEY, **headers})
        assert r.status_code == 422, r.text[:500]


def test_deep_yaml_is_422_not_500(secured):
    flow = "[" * 100_000 + "]" * 100_000  # flow style: refused by the nesting scan
    block = "".join(" " * i + "- \n" for i in range(1200))  # block style: the parser's recursion limit, as a 422
    for body in (flow, block):
        r = secured.post("/api/train/start", content=body, headers={**AUTH, "Content-Type": "application/yaml"})
        assert r.status_code == 422, r.text[:500]


def test_legitimate_nesting_and_brackets_in_strings_pass(secured):
    nested: Any = {"strategy": "lora", "dataset_path": "missing.jsonl"}
    brackets = "[" * 5000 + '\\" {{{ \\\\'  # inside a string: not nesting
    body = {"dataset_path": brackets, "config": {"max_steps": 1}}
    r = secured.post("/api/train/start", json=body, headers=AUTH)
    assert r.status_code != 422 or "max_json_depth" not in r.text, r.text
    nested["lora_config"] = {"target_modules": [[[["q_proj"]]]]}  # a few levels: read (and judged) as usual
    r = secured.post("/api/train/start", json=nested, headers=AUTH)
    assert "max_json_depth" not in r.text


def test_nesting_scan_is_exact():
    assert not json_too_deep(b"[" * 64 + b"]" * 64, 64) and json_too_deep(b"[" * 65 + b"]" * 65, 64)
    assert json_too_deep(b"[" * 65, 64)  # unterminated: a parser would recurse before failing
    assert not json_too_deep(json.dumps(["[" * 1000, "{" * 1000]).encode(), 64)
    assert not json_too_deep(b'["\\\\", "\\"' + b"[" * 100 + b'"]', 64)  # escaped quote: still inside the string
    assert json_too_deep(b'["\\\\", ' + b"[" * 100 + b"]" * 100 + b"]", 64)  # escaped backslash: the string ends
    assert json_too_deep(("[" * 100 + "]" * 100).encode("utf-16"), 64)  # json.loads reads UTF-16 too
    assert not json_too_deep(json.dumps([["[" * 100]] * 10_000).encode(), 64)
    wide = b"[" + b",".join([b"[1]"] * 500_000) + b"]"  # spans many scan chunks, depth 2
    assert not json_too_deep(wide, 64) and json_too_deep(wide[:-1] + b"," + b"[" * 64 + b"]" * 64 + b"]", 64)


def test_file_name_over_255_bytes_is_refused_clearly(secured, settings):
    r = secured.post("/api/data/upload", files={"file": ("n" * 300 + ".jsonl", CHAT)}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "306 bytes long" in r.json()["error"]["message"]
    r = secured.post("/api/data/upload", files={"file": ("é" * 127 + ".json", CHAT)}, headers=AUTH)  # 259 bytes
    assert r.status_code == 422, r.text
    r = secured.post("/api/data/upload", files={"file": ("n" * 250 + ".json", CHAT)}, headers=AUTH)  # 255 bytes
    assert r.status_code == 201, r.text
    r = secured.post(
        "/v1/files", files={"file": ("n" * 300 + ".jsonl", CHAT)}, data={"purpose": "fine-tune"}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    assert leftovers(settings.data_dir / "files") == []
    assert [p for p in leftovers(settings.data_dir / "uploads") if ".upload-" in p] == []


def test_upload_form_errors_are_422(secured):
    r = secured.post("/api/data/upload", data={"overwrite": "true"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["message"] == "file: Field required"
    r = secured.post("/v1/files", files={"file": ("a.jsonl", CHAT)}, headers=AUTH)
    assert r.status_code == 422 and "purpose: Field required" in r.json()["error"]["message"]
    r = secured.post("/api/data/upload", files={"file": ("a.jsonl", CHAT)}, data={"overwrite": "maybe"}, headers=AUTH)
    assert r.status_code == 422 and "overwrite" in r.json()["error"]["message"]
    cut = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{CHAT.decode()}'
    r = secured.post("/api/data/upload", content=cut, headers={**AUTH, **MULTIPART})  # no closing boundary
    assert r.status_code == 422 and "incomplete" in r.json()["error"]["message"]


# -- disk full and unexpected errors --------------------------------------------------------------------------


def test_disk_full_during_an_upload_is_507_and_leaves_nothing(secured, settings, monkeypatch):
    """A real ENOSPC from the kernel: the upload's temporary file descriptor is pointed at /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr("service.data.tempfile.mkstemp", mkstemp_on_full_disk)
    for path, data in (("/api/data/upload", {}), ("/v1/files", {"purpose": "fine-tune"})):
        r = secured.post(path, files={"file": ("full.jsonl", CHAT * 15_000)}, data=data, headers=AUTH)
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["type"] == "insufficient_storage" and "disk is full" in error["message"]
        assert str(settings.data_dir) not in r.text and "/" not in error["message"]
    assert leftovers(settings.data_dir / "uploads") == [] and leftovers(settings.data_dir / "files") == []


def test_disk_full_on_a_real_full_filesystem_is_507(tmp_path, tiny_model_root):
    """A live server whose data dir is a 4 MB tmpfs (its own mount namespace): an upload fills it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root) for a private tmpfs")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "config.yaml"
    cfg = {
        "paths": {"data_dir": str(data_dir), "model_dir": str(tiny_model_root), "db_path": str(tmp_path / "t.db")},
        "models": {"base_model": TINY_NAME},
        "server": {"max_body_mb": 64},
        "data": {"max_upload_mb": 64},
        "auth": {"api_keys": [KEY]},
    }
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port = free_port()
    serve = f"mount -t tmpfs -o size=4m tmpfs {data_dir} && exec {sys.executable} main.py --config {config} "
    serve += f"--port {port} --log-level warning"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", serve], cwd=PROJECT_ROOT, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
        r = client.post("/api/data/upload", files={"file": ("big.jsonl", CHAT * (6 * MIB // len(CHAT)))})
        assert r.status_code == 507, r.text
        assert r.json()["error"]["type"] == "insufficient_storage" and str(data_dir) not in r.text
        # the partial file was removed: the 4 MB disk takes a 3 MB upload again
        r = client.post("/api/data/upload", files={"file": ("fits.jsonl", CHAT * (3 * MIB // len(CHAT)))})
        assert r.status_code == 201, r.text
    finally:
        stop_server(proc)
        log.close()


def test_500_names_the_exception_type_but_no_server_path(settings, caplog):
    app = create_app(settings)
    secret = str(settings.data_dir / "secret-folder")

    @app.get("/api/boom")
    def boom() -> None:
        raise RuntimeError(f"cannot read {secret}")

    @app.get("/api/gone")
    def gone() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file", secret)

    @app.get("/api/quota")
    def quota() -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", secret)

    with TestClient(app, raise_server_exceptions=False) as client:
        for path, kind in (("/api/boom", "RuntimeError"), ("/api/gone", "FileNotFoundError")):
            r = client.get(path)
            assert r.status_code == 500 and secret not in r.text and "/" not in r.json()["error"]["message"]
            assert r.json()["error"] == {
                "type": "internal_error",
                "message": f"Internal server error ({kind}); the server log has the details.",
                "details": {"exception": kind},
            }
        r = client.get("/api/quota")
        assert r.status_code == 507 and "quota" in r.json()["error"]["message"] and secret not in r.text
    assert secret in caplog.text  # the detail stays in the log


def test_oversize_upload_through_the_sdk_style_client(secured):
    body = io.BytesIO(b"x" * (UPLOAD_MB * MIB + 1))
    r = secured.post("/api/data/upload", files={"file": ("big.jsonl", body)}, headers=AUTH)
    assert r.status_code == 413 and "2 MB limit" in r.json()["error"]["message"]
