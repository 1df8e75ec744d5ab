"""The store's database: engine creation, the write lock and Alembic migrations, per backend (SQLite, PostgreSQL)."""

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import ColumnElement, Connection, Engine, create_engine, event, func, inspect, make_url, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from util.errors import InvalidInputError
from util.settings import PROJECT_ROOT, SQLITE_SIDE_FILES, sqlite_file_of

log = logging.getLogger(__name__)

MIGRATIONS_DIR = PROJECT_ROOT / "migrations"
BASELINE_REVISION = "0001"  # the schema of the release before migrations existed
WRITE_LOCK_KEY = 0x57_54_53  # pg_advisory_xact_lock key of the store's write sections ("WTS")
MIGRATE_LOCK_KEY = 0x57_54_4D  # pg_advisory_lock key held while migrating ("WTM")
# The database did not answer: down, restarting, unreachable, or (SQLite) locked past its busy timeout
STORE_ERRORS = (OperationalError, InterfaceError)
T = TypeVar("T")


def store_error_text(exc: BaseException) -> str:
    """The driver's own message of a store error (without SQLAlchemy's statement and parameters)."""
    return str(getattr(exc, "orig", None) or exc).strip()


SQLITE_FULL = 13  # sqlite3's error code for "database or disk is full" (a write found no space)
PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or one it wraps) says the disk is full, as opposed to a database outage.

    SQLite's SQLITE_FULL ("database or disk is full"), PostgreSQL's 53100 disk_full, an OSError ENOSPC/EDQUOT from
    writing a file, or an error of a library that carries that OS error's text. Looks through SQLAlchemy's `orig`
    and the exception's cause and context.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(exc) for code in DISK_FULL_ERRNOS):  # a library's wrapped OS error
            return True  # (e.g. safetensors: "I/O error: No space left on device (os error 28)")
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(exc)
        ):
            return True
        if getattr(exc, "sqlstate", None) == PG_DISK_FULL or getattr(exc, "pgcode", None) == PG_DISK_FULL:
            return True
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException) and id(orig) not in seen:
            exc = orig
            continue
        exc = exc.__cause__ or exc.__context__
    return False


def retry_store(call: Callable[[], T], seconds: float, what: str, wait_for_space: bool = False) -> T:
    """Run `call`, retrying with backoff while the database does not answer, for up to `seconds`; then raise.

    A full disk is not an outage: its error is raised at once (the caller can record a failure now), unless
    `wait_for_space` (a run's worker, whose weights live only in its memory), which waits for space as for an outage.
    """
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return call()
        except STORE_ERRORS as exc:
            full = is_disk_full(exc)
            if (full and not wait_for_space) or time.monotonic() + delay > deadline:
                raise
            state = "disk full" if full else "task store unavailable"
            log.warning("%s while %s (%s); retrying in %.1f s", state, what, store_error_text(exc), delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


RESERVE_BYTES = 1 << 20  # the spare file kept beside a SQLite store, given up when the disk is full
RESERVE_SUFFIX = SQLITE_SIDE_FILES[-1]  # "-reserve": a client path never names it (Settings.private_paths)


def sqlite_file(bind: Engine | str | Path) -> Path | None:
    """The SQLite file of an engine or URL; None for PostgreSQL or an in-memory database."""
    return sqlite_file_of(bind.url if isinstance(bind, Engine) else database_url(bind))


class DiskReserve:
    """A spare file (RESERVE_BYTES) beside a SQLite store, so a full disk can still take a task's outcome.

    When a store write fails for a full disk, the writer deletes the spare and writes again: the few pages a status
    change needs fit in the space it held. The server re-creates it (`ensure`) once the disk has room again; while it
    is missing and cannot be re-created, /health reports the disk full. A PostgreSQL store has none (its disk is the
    database server's).
    """

    def __init__(self, db_file: Path | None) -> None:
        """Bind to a store's SQLite file (None: no reserve)."""
        self.path = None if db_file is None else db_file.with_name(db_file.name + RESERVE_SUFFIX)

    def release(self) -> bool:
        """Delete the spare file to free its space; whether there was one."""
        if self.path is None:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning("disk full: gave up the store's reserve of %d KiB to record a task's outcome", RESERVE_BYTES >> 10)
        return True

    def ensure(self) -> bool:
        """(Re-)create the spare file if it is missing and the disk has room for it and more; whether it exists."""
        if self.path is None:
            return True
        with suppress(FileNotFoundError):
            if self.path.stat().st_size >= RESERVE_BYTES:
                return True
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            if shutil.disk_usage(self.path.parent).free < RESERVE_BYTES + low_space_bytes(self.path.parent):
                return False
            staging.unlink(missing_ok=True)  # a stale one (or a planted link): created anew, never written through
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, RESERVE_BYTES)  # blocks really taken (a sparse file frees nothing)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.write(fd, b"\0" * RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(staging, self.path)
        except OSError as exc:
            log.warning("could not create the store's disk reserve: %s", exc)
            with suppress(OSError):
                staging.unlink(missing_ok=True)
            return False
        return True


def low_space_bytes(folder: Path) -> int:
    """Free space below which a folder's filesystem counts as full: 64 MiB, or 2% of a small filesystem."""
    return min(64 << 20, shutil.disk_usage(folder).total // 50)


class Patient:
    """A store whose every method call waits out a database outage (up to `seconds`) instead of raising.

    For a worker whose state lives only in its own memory (a run's weights), where giving up would lose it; a full
    disk is waited out the same way (logged as such), as space may be freed. A write whose commit reached the
    database but whose answer did not is sent again, as any retry would.
    """

    def __init__(self, store: object, seconds: float) -> None:
        """Wrap `store`."""
        self._store = store
        self._seconds = seconds

    def __getattr__(self, name: str) -> object:
        """The store's attribute; a method comes back wrapped in retry_store."""
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def patient(*args: object, **kwargs: object) -> object:
            return retry_store(lambda: attr(*args, **kwargs), self._seconds, name, wait_for_space=True)

        return patient


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL: a filesystem path becomes a SQLite URL, a URL is kept."""
    text_ = str(target)
    return text_ if "://" in text_ else f"sqlite:///{Path(text_)}"


def is_postgres(bind: Engine | Connection | Session) -> bool:
    """Whether the engine (or a session's connection) speaks PostgreSQL."""
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    return dialect.name == "postgresql"


def make_engine(target: str | Path, migrate: bool = True) -> Engine:
    """Create an engine for one process and bring the schema to the newest migration.

    SQLite: WAL mode and a busy timeout, so several processes can write one file. PostgreSQL (`postgresql+psycopg`):
    a pre-pinged pool. Never share the engine across a fork.
    """
    url = make_url(database_url(target))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    elif url.get_backend_name() == "postgresql":
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    else:
        raise InvalidInputError(
            f"database.url must be a sqlite:// or postgresql+psycopg:// URL, not '{url.get_backend_name()}'.",
            details={"backend": url.get_backend_name()},
        )
    if migrate:
        upgrade(engine)
    return engine


def json_text(engine: Engine, column: ColumnElement, *keys: str) -> ColumnElement:
    """The value at `keys` inside a JSON column, as SQL text (NULL where absent), on either backend.

    SQLite: `json_extract(col, '$."a"."b"')` (keys must not hold `"` or a backslash). PostgreSQL:
    `json_extract_path_text(col, 'a', 'b')`, the keys bound as parameters.
    """
    if is_postgres(engine):
        return func.json_extract_path_text(column, *keys)
    return func.json_extract(column, "$" + "".join(f'."{key}"' for key in keys))


def lock_for_write(session: Session) -> None:
    """Make the rest of this session's transaction exclusive among writers, so a check-then-insert is atomic.

    SQLite: `BEGIN IMMEDIATE` (must be the session's first statement). PostgreSQL: a transaction-level advisory
    lock, released at commit or rollback. Another writer waits here until this session ends, so two requests can
    never both pass a limit check before either has inserted.
    """
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
    else:
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code: the repository's migrations, run on `connection`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest migration in the repository."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: no alembic_version table)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the store's migration lock: a PostgreSQL advisory lock, or a lock file next to SQLite."""
    if is_postgres(engine):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    lock_path = Path(f"{database}.migrate.lock") if database and database != ":memory:" else None
    fh = lock_path.open("w") if lock_path else None
    try:
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        with engine.connect() as conn:
            # A migration that rebuilds a table (SQLite's move-and-copy) drops the old one: with foreign keys on,
            # that would cascade into its children (a task's events). Off for the migration; on again after.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            try:
                yield conn
            finally:
                conn.rollback()
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    finally:
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest migration; return the revision it started from ('' for an empty store).

    A store from the release before migrations (its tables, no alembic_version) goes through the baseline
    revision, which only adds the tables it lacks, and then the later ones, which upgrade it in place and keep
    its rows. Concurrent callers (several servers, a worker starting) take turns; each finds the work done.
    """
    head = head_revision()
    if current_revision(engine) == head:
        return head
    with _migration_lock(engine) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return head
        if current is None and inspect(conn).has_table("tasks"):
            # The baseline revision creates only the tables such a store lacks, then the later ones upgrade it.
            log.info("upgrading a task store made before migrations; its rows are kept")
        command.upgrade(alembic_config(conn), "head")
        conn.commit()
        log.info("task store migrated from %s to %s", current or "empty", head)
        return current or ""


LEGACY_DB_NAME = "tasks.db"  # the task database's old default place was the data dir: data/tasks.db


def relocate_legacy_store(db_path: Path, data_dir: Path) -> Path:
    """Move an install's task database out of the data dir (its old default) to `db_path`; return the file to use.

    The data dir is where clients read and write, so the database no longer lives there. A SQLite copy (the backup
    API, after a WAL checkpoint) goes to a temp name beside `db_path` and is renamed into place; then the old files
    are removed. While the old store still has a live worker (a running task or run, which writes to the old file),
    nothing moves: the old file stays in use (still closed to clients) and moves on a later start.
    """
    legacy = data_dir / LEGACY_DB_NAME
    if db_path.resolve() == legacy.resolve() or not legacy.is_file() or legacy.is_symlink():
        return db_path
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(db_path.parent / f".{db_path.name}.relocate.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # servers starting together: one moves, the others find it moved
        if not legacy.is_file():
            return db_path
        if db_path.exists():
            log.warning(
                "a task database exists both at paths.db_path and in the data dir (%s); using paths.db_path and "
                "leaving the other one alone (clients cannot open it only while it is the configured store)",
                LEGACY_DB_NAME,
            )
            return db_path
        source = sqlite3.connect(legacy, timeout=30)
        try:
            if _live_workers(source):
                log.warning(
                    "the task database is still in the data dir and a worker writes to it; it moves to "
                    "paths.db_path on a start with no running task or run"
                )
                return legacy
            source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            staging = db_path.with_name(f".{db_path.name}.{os.getpid()}.relocating")
            staging.unlink(missing_ok=True)
            copy = sqlite3.connect(staging)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
        os.replace(staging, db_path)
        for suffix in ("", *SQLITE_SIDE_FILES):
            legacy.with_name(legacy.name + suffix).unlink(missing_ok=True)
        log.warning("moved the task database out of the data dir to paths.db_path (clients can no longer reach it)")
        return db_path
    finally:
        os.close(lock_fd)


def _live_workers(conn: sqlite3.Connection) -> bool:
    """Whether a store has a running task or a live run, whose worker may still write to it."""
    queries = (
        "SELECT count(*) FROM tasks WHERE status = 'running'",
        "SELECT count(*) FROM runs WHERE status IN ('starting', 'ready')",
    )
    for query in queries:
        try:
            if conn.execute(query).fetchone()[0]:
                return True
        except sqlite3.OperationalError:  # a store from before that table existed, or an empty file
            continue
    return False
