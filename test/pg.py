"""A throwaway PostgreSQL server for the store tests: initdb + pg_ctl on loopback, as a non-root user."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from util.settings import DatabaseSettings, Settings

REQUIRE_ENV = "WINTRAIN_REQUIRE_POSTGRES"  # set by .ci/run: there a missing PostgreSQL fails instead of skipping


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl live: `pg_config --bindir`, Debian's /usr/lib/postgresql/*/bin, or PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        candidates.append(Path(out))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One throwaway PostgreSQL cluster in a temp dir on 127.0.0.1 (trust auth, no fsync); stop and start at will."""

    def __init__(self) -> None:
        """initdb a new cluster (skip, or fail under WINTRAIN_REQUIRE_POSTGRES, when PostgreSQL is missing)."""
        bindir = pg_bindir()
        if bindir is None:
            reason = "PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's `postgresql` package"
            if os.environ.get(REQUIRE_ENV):
                pytest.fail(f"{reason} ({REQUIRE_ENV} is set)")
            pytest.skip(reason)
        self.bindir = bindir
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
                pytest.fail("running as root needs `runuser` and a `postgres` system user (Debian's postgresql has it)")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="wt-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        if self.prefix:
            shutil.chown(self.root, "postgres")
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"  # the server, without a database
        init = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if init.returncode:
            pytest.fail(f"initdb failed: {init.stderr}")

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        """Run one of PostgreSQL's programs as the cluster's owner."""
        return subprocess.run([*self.prefix, str(self.bindir / tool), *args], capture_output=True, text=True)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        start = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start")
        if start.returncode:
            pytest.fail(f"pg_ctl start failed: {start.stderr}\n{self.log.read_text() if self.log.exists() else ''}")

    def stop(self) -> None:
        """Stop the server at once (open connections break, as in an outage)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        """Stop the server and delete the cluster."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server for the whole session; yield its URL without a database."""
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.remove()


def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; return its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """The URL of a fresh database for one test."""
    return create_database(pg_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh task store URL on each backend: a SQLite file, and a database on the throwaway PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return create_database(request.getfixturevalue("pg_server"))


def with_database(settings: Settings, url: str) -> Settings:
    """The same settings with the task store at `url`."""
    return settings.model_copy(update={"database": DatabaseSettings(url=url)})


# Run a test that uses the `settings` (or `client`) fixture once on SQLite and once on PostgreSQL.
both_backends = pytest.mark.parametrize("settings", ["sqlite", "postgresql"], indirect=True)
