"""The store's database: engine creation, the write lock and Alembic migrations, per backend (SQLite, PostgreSQL)."""

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from util.settings import PROJECT_ROOT

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


def retry_store(call: Callable[[], T], seconds: float, what: str) -> T:
    """Run `call`, retrying with backoff while the database does not answer, for up to `seconds`; then raise."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return call()
        except STORE_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("task store unavailable while %s (%s); retrying in %.1f s", what, store_error_text(exc), delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


class Patient:
    """A store whose every method call waits out a database outage (up to `seconds`) instead of raising.

    For a worker whose state lives only in its own memory (a run's weights), where giving up would lose it. A write
    whose commit reached the database but whose answer did not is sent again, as any retry would.
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
            return retry_store(lambda: attr(*args, **kwargs), self._seconds, name)

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
