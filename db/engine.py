"""The database engine: URL resolution, SQLite connection setup, and schema migration on open.

SQLite (the default) runs in WAL mode with a busy timeout; SQLAlchemy emits BEGIN itself so a
write transaction can take the write lock up front (BEGIN IMMEDIATE) instead of failing when it
upgrades from a read lock. PostgreSQL gets the psycopg 3 driver unless the URL names another.

Faults: a SQLite file is created once, when the engine is made; later connections open it without
creating it, so a file deleted while the daemon runs is an error (StoreUnavailable), never a silent
new empty store. After a driver error the connection pool is replaced, so connections opened while
the file was read-only, damaged or full do not outlive the fault. check_health() proves the schema,
the file's identity and that a write commits.
"""

from __future__ import annotations

import os
import sqlite3
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from tunerd.kernels.runtime import cache_dir

from .errors import SchemaError, StoreError, StoreUnavailable

SUPPORTED = ("sqlite", "postgresql")
MIGRATIONS = Path(__file__).parent / "migrations"
WRITE = "tunerd_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_PG_MIGRATION_LOCK = 0x74756E6572  # pg_advisory_xact_lock key held while migrating ("tuner")
MIN_FREE_BYTES = 1 << 20  # a SQLite store's disk with less free space than this is full
POOL_TIMEOUT_S = 10.0  # waiting for a pooled connection longer than this is StoreUnavailable (503)
_files: weakref.WeakKeyDictionary[Engine, _File] = weakref.WeakKeyDictionary()


class Transactional:
    """Base of the store's operation mixins (db.queue.JobQueue, db.binaries.BinaryStore, db.compiles.CompileQueue):
    db.store.Store provides the read and write transactions they run in."""

    def _read(self) -> AbstractContextManager[Session]:  # pragma: no cover - provided by Store
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Session]:  # pragma: no cover - provided by Store
        raise NotImplementedError


class _File:
    """A SQLite engine's database file and the identity (device, inode) of the file it opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identity = self.current()

    def current(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino


def default_url() -> str:
    """$TUNERD_DB, else a SQLite file next to the kernel cache (honours $TUNERD_CACHE_DIR)."""
    env = os.environ.get("TUNERD_DB")
    if env:
        return env
    return f"sqlite:///{cache_dir().parent / 'tunerd.sqlite'}"


def parse_url(url: str | URL | None) -> URL:
    raw = url if url is not None else default_url()
    try:
        u = make_url(raw)
    except exc.ArgumentError as e:
        where = "" if url is not None else " ($TUNERD_DB takes a URL, e.g. sqlite:////abs/path/tunerd.sqlite)"
        raise StoreError(f"not a database URL: {raw!r}{where} ({e})") from None
    backend = u.get_backend_name()
    if backend not in SUPPORTED:
        raise StoreError(f"tunerd's store runs on {' or '.join(SUPPORTED)}, not {backend!r} ({safe(u)})")
    if backend == "postgresql" and u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3, the driver tunerd installs
    return u


def safe(url: URL) -> str:
    """The URL with its password hidden, for messages."""
    return url.render_as_string(hide_password=True)


def create(url: str | URL | None = None, *, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for url (default_url() when None), not yet migrated."""
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite(u, busy_timeout_s)
    return create_engine(
        u,
        pool_pre_ping=True,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args={"connect_timeout": max(1, int(busy_timeout_s))},
    )


def _wal(cur: Any, timeout_s: float) -> None:
    """Switch the file to WAL. Two processes opening a fresh file at once can get "database is locked"
    here without SQLite's busy handler being consulted (it refuses to wait where waiting could
    deadlock), so retry within the busy timeout; once one succeeds the mode is persistent."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite(u: URL, busy_timeout_s: float) -> Engine:
    """A file (WAL, busy timeout, foreign keys) or, for "sqlite://", one shared in-memory connection:
    the latter is for tests and single-threaded tools, not for a daemon serving threads."""
    memory = u.database in (None, "", ":memory:")
    kw: dict[str, Any] = dict(poolclass=StaticPool) if memory else {}
    if u.database is not None and not memory:
        path = Path(u.database).expanduser().absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                sqlite3.connect(path).close()  # the one place a database file is created
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot create {safe(u)}: {e}") from None
        uri = f"file:{quote(str(path))}?mode=rw"  # never create it again: a vanished file is an error

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False)

        kw.update(creator=connect, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT_S)
    engine = create_engine(u, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}, **kw)
    if not memory:
        _files[engine] = _File(path)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _on_begin)
        cur = dbapi_conn.cursor()
        if not memory:
            _wal(cur, busy_timeout_s)
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process kills; WAL keeps it consistent
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")

    return engine


def _alembic_config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic head revision in {MIGRATIONS}")
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the schema to head; safe when several processes open one database at once."""
    head = head_revision()
    with guard(engine):
        with engine.connect() as conn:
            if current_revision(conn) == head:  # fast path: no write lock taken
                return head
        with engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            rev = current_revision(conn)  # re-read under the lock: another process may have migrated
            known = {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}
            if rev is not None and rev not in known:
                raise SchemaError(
                    f"database {safe(engine.url)} is at schema revision {rev!r}, which this tunerd "
                    f"does not know (its newest is {head!r}): it was written by a newer tunerd"
                )
            if rev != head:
                command.upgrade(_alembic_config(conn), "head")
    return head


@contextmanager
def guard(engine: Engine) -> Iterator[None]:
    """Translate driver errors into StoreUnavailable / StoreError with the (password-free) URL; after
    an error that can outlive its cause in a pooled connection, replace the pool."""
    try:
        yield
    except StoreError:
        raise
    except exc.TimeoutError as e:  # no pooled connection came free in time
        raise StoreUnavailable(
            f"database {safe(engine.url)} busy: no connection free within {POOL_TIMEOUT_S:g}s"
        ) from e
    except exc.OperationalError as e:
        _recycle(engine, e)
        raise StoreUnavailable(f"database {safe(engine.url)} unavailable: {_first_line(e)}") from e
    except exc.InterfaceError as e:
        _recycle(engine, e)
        raise StoreUnavailable(f"database {safe(engine.url)} connection failed: {_first_line(e)}") from e
    except exc.DBAPIError as e:
        if e.connection_invalidated:
            raise StoreUnavailable(f"database {safe(engine.url)} connection lost: {_first_line(e)}") from e
        if type(e) is exc.DatabaseError:  # SQLite: "file is not a database", "disk image is malformed"
            _recycle(engine, e)
            raise StoreUnavailable(f"database {safe(engine.url)} is damaged: {_first_line(e)}") from e
        raise StoreError(f"database {safe(engine.url)} rejected the operation: {_first_line(e)}") from e


def _recycle(engine: Engine, e: exc.DBAPIError) -> None:
    """Replace the pool (connections return to the old one and close): a connection opened while the
    file was read-only stays read-only, one on a damaged or replaced file keeps failing. Lock waits
    and the shared in-memory connection are left alone."""
    if "locked" in _first_line(e) or (engine.dialect.name == "sqlite" and engine not in _files):
        return
    engine.dispose()


def check_health(engine: Engine, *, write: bool = True) -> None:
    """Raise StoreUnavailable (SchemaError for a foreign schema) unless the store is sound.

    Always (cheap, file stores): the SQLite file is still the file that was opened (not deleted or
    replaced), starts with SQLite's header, is writable, and its disk has MIN_FREE_BYTES free (a write
    into WAL space already allocated succeeds on a full disk). With write: the schema is at this
    tunerd's head revision and a write transaction commits (read-only, damaged or full fails here)."""
    f = _files.get(engine)
    if f is not None:
        now = f.current()
        if now is None:
            raise StoreUnavailable(
                f"database file {f.path} is gone (deleted or moved while tunerd ran); restore "
                f"it: tunerd does not start an empty store in its place"
            )
        if now != f.identity:  # put back (or replaced): reopen it, then prove it below
            engine.dispose()
            f.identity = now
        try:
            st = os.statvfs(f.path)
            free = st.f_bavail * st.f_frsize
        except (OSError, AttributeError):  # no statvfs: the write below still tells
            free = MIN_FREE_BYTES
        if free < MIN_FREE_BYTES:
            raise StoreUnavailable(f"the disk of {f.path} is full ({free} bytes free): writes will fail")
        try:
            with open(f.path, "rb") as fh:
                header = fh.read(16)
        except OSError as e:
            raise StoreUnavailable(f"database file {f.path} cannot be read: {e.strerror or e}") from None
        if header and header != b"SQLite format 3\0":
            raise StoreUnavailable(f"database file {f.path} is damaged: its header is not SQLite's")
        if not os.access(f.path, os.W_OK) or not os.access(f.path.parent, os.W_OK):
            raise StoreUnavailable(f"database file {f.path} (or its directory) is read-only")
    if not write:
        return
    head = head_revision()
    with guard(engine):
        with engine.connect().execution_options(**{WRITE: True}) as conn, conn.begin():
            rev = current_revision(conn)
            if rev != head:
                raise SchemaError(
                    f"database {safe(engine.url)} is at schema revision {rev!r}, this tunerd "
                    f"needs {head!r}" + (" (no tunerd schema: an empty or foreign database)" if rev is None else "")
                )
            conn.execute(text("UPDATE alembic_version SET version_num = version_num"))  # a real write


def _first_line(e: exc.DBAPIError) -> str:
    return str(e.orig if e.orig is not None else e).strip().splitlines()[0]
