"""The audit store's database: the engine, its SQLite/PostgreSQL setup, transactions, locks and errors.

One code path over SQLAlchemy 2's async engine: SQLite through aiosqlite (the embedded default, a file in
`CDS_DATA_DIR`) or PostgreSQL through asyncpg (`CDS_DATABASE_URL`). The schema (`tables.py`) is created and
upgraded by alembic (`migrations/`) when the store opens. What is stored, and how, lives next to this module:
`cards.py` (the issued-cards sink), `feedback.py` (feedback, the summary and the dashboard's queries),
`replay.py` (the JWT replay cache), `retention.py`, `writer.py` (the background audit writer); `store.py`
puts them together as `Store`.

Concurrency and durability:
- SQLite runs in WAL mode with `synchronous=FULL` and a busy timeout, and every write transaction starts with
  `BEGIN IMMEDIATE`, so writers from several processes queue for the write lock instead of failing, and a
  check-then-insert (unknown card uuids, replay claims) cannot be overtaken between its read and its write.
- Every committed write is on disk when the call returns: a restart, or a killed process, loses nothing.
- In a SQLite file, issued cards are written by a thread of their own (see `cards.py` for why), the other write
  transactions (JWT replay claims, feedback, suppressed-card counts, retention's deletes) by another
  (`run_writing`) and the reads by a third (`run_reading`), each on a connection of its own.

Failures of the database itself raise `StoreUnavailable` (or `StoreError`), are counted in
`cds_store_errors_total{operation=...}` and logged without SQL parameters, so no PHI reaches the logs; callers
decide whether to degrade (cards are still returned when recording them fails).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from ..metrics import STORE_ERRORS
from . import migrations

log = logging.getLogger("cds.store")

T = TypeVar("T")


class StoreError(Exception):
    """The database failed an operation (a bug or a broken database rather than an outage)."""


class StoreUnavailable(StoreError):
    """The database could not be reached or did not answer in time."""


class UnknownCard(LookupError):
    """Feedback names a card uuid this service never issued; nothing of the batch was stored."""

    def __init__(self, uuid: str) -> None:
        super().__init__(uuid)
        self.uuid = uuid

    def __str__(self) -> str:
        return f"unknown card {self.uuid!r}"


class Database:
    """The engine and its transactions; `Store` (store.py) adds what is stored. One per process (it has a pool)."""

    def __init__(self, engine: AsyncEngine, thread_engine: sa.Engine | None = None) -> None:
        self._engine = engine
        self.thread_engine = thread_engine  # SQLite files: a synchronous engine for the store's threads (cards.py's,
        # run_writing's and run_reading's), a connection each
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="cds-store-writes") \
            if thread_engine is not None else None  # its thread starts on the first write
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="cds-store-reads") \
            if thread_engine is not None else None  # a WAL reader never waits for a writer: a thread of its own
        self.dialect = engine.dialect.name
        self.engine_dialect = engine.dialect
        self.insert: Callable[[sa.Table], Any] = (pg_dialect.insert if self.dialect == "postgresql"
                                                  else sqlite_dialect.insert)  # with ON CONFLICT
        self._schema_ready = False  # set once migrations ran (or were run explicitly) in this process
        self._schema_lock = asyncio.Lock()

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine, for tools and tests that read or change the tables directly (unguarded)."""
        return self._engine

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, busy_timeout_s: float = 30.0,
                   connect_timeout_s: float = 5.0) -> Self:
        """Connect (creating a SQLite file's directory) and bring the schema up to date.

        Raises `StoreUnavailable` if the database cannot be reached. With `migrate=False` the database is not
        touched yet: the first operation that reads or writes data migrates it first (and again on the next
        operation if that failed), so a service can start while its database is down and catch up later.
        """
        try:
            engine = _create_engine(url, busy_timeout_s=busy_timeout_s, connect_timeout_s=connect_timeout_s)
        except OSError as exc:  # the SQLite file's directory cannot be created
            STORE_ERRORS.labels(operation="open").inc()
            log.error("store open failed: %s", _describe(exc))
            raise StoreUnavailable(f"open: {_describe(exc)}") from exc
        store = cls(engine, _create_thread_engine(engine, busy_timeout_s=busy_timeout_s))
        if migrate:
            try:
                await store.migrate()
            except BaseException:
                await store.close()
                raise
        return store

    async def migrate(self, target: int | None = None) -> int:
        """Apply pending migrations (serialised across processes); returns the schema version."""
        async with self.guard("open"):
            _, after = await migrations.upgrade(self._engine, target)
        self._schema_ready = True  # migrations.upgrade_sync logged what it did
        return after

    async def schema_version(self) -> int:
        async with self.guard("open"):
            return await migrations.current_version(self._engine)

    async def close(self) -> None:
        for thread in (self._write_thread, self._read_thread):
            if thread is not None:
                thread.shutdown(wait=True)  # a transaction under way is finished first
        if self.thread_engine is not None:
            self.thread_engine.dispose()
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True if the database answers a trivial query within `timeout_s`; never raises."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            return True
        except Exception as exc:  # noqa: BLE001 - a readiness check reports, it doesn't raise
            STORE_ERRORS.labels(operation="ping").inc()
            log.warning("store ping failed: %s", _describe(exc))
            return False

    @asynccontextmanager
    async def guard(self, operation: str) -> AsyncIterator[None]:
        """Database failures become `StoreUnavailable` or `StoreError`, counted and logged without parameters."""
        try:
            yield
        except (UnknownCard, ValueError):
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            STORE_ERRORS.labels(operation=operation).inc()
            log.error("store %s failed: %s", operation, _describe(exc))
            kind = StoreUnavailable if _is_outage(exc) else StoreError
            raise kind(f"{operation}: {_describe(exc)}") from exc

    async def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            if not self._schema_ready:
                await migrations.upgrade(self._engine)
                self._schema_ready = True
                log.info("store schema brought up to date on first use")

    @asynccontextmanager
    async def writing(self, operation: str) -> AsyncIterator[AsyncConnection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, i.e. the write lock first), guarded."""
        async with self.guard(operation):
            await self.ensure_schema()
            async with self._engine.begin() as conn:
                yield conn

    async def run_writing(self, operation: str, write: Callable[[sa.Connection], T], *,
                          thread: ThreadPoolExecutor | None = None) -> T:
        """`write(conn)` in a write transaction, guarded, with a synchronous connection; its result.

        In a SQLite file on a thread of the store's own (or on `thread`: the issued cards have one, so that a card
        batch never holds up a replay claim), on a connection of its thread engine. Through aiosqlite a
        transaction is some nine round trips between the event loop and aiosqlite's thread, each a wake-up of
        both: a batch of replay claims cost the event loop 1.9-3.4 ms of CPU and a feedback call 3.4-3.7 ms; on the
        thread 0.2-0.6 ms and 0.2 ms (bench/README.md, "Measurements behind the code"). Elsewhere (PostgreSQL
        through asyncpg, in-memory SQLite) on the async engine, through `run_sync`. `write` builds its statements
        itself, so that that work too is done on the thread.
        """
        if self._write_thread is None:
            async with self.writing(operation) as conn:
                return await conn.run_sync(write)
        return await self._on_thread(operation, thread or self._write_thread, self._write_sync, write)

    def _write_sync(self, write: Callable[[sa.Connection], T]) -> T:
        assert self.thread_engine is not None
        with self.thread_engine.begin() as conn:  # BEGIN IMMEDIATE; committed when `write` returns
            return write(conn)

    async def run_reading(self, operation: str, read: Callable[[sa.Connection], T]) -> T:
        """`read(conn)` in a read transaction on one snapshot for all its queries, guarded, with a synchronous
        connection; its result. In a SQLite file on a thread of the store's own (see `run_writing`), elsewhere
        through `run_sync` on the async engine (PostgreSQL: REPEATABLE READ)."""
        if self._read_thread is None:
            async with self.guard(operation):
                await self.ensure_schema()
                async with self._engine.connect() as conn:
                    if self.dialect == "postgresql":
                        await conn.execution_options(isolation_level="REPEATABLE READ")
                    else:
                        await conn.execution_options(cds_sqlite_begin="DEFERRED")
                    async with conn.begin():
                        return await conn.run_sync(read)
        return await self._on_thread(operation, self._read_thread, self._read_sync, read)

    async def _on_thread(self, operation: str, thread: ThreadPoolExecutor,
                         transaction: Callable[[Callable[[sa.Connection], T]], T],
                         work: Callable[[sa.Connection], T]) -> T:
        async with self.guard(operation):
            await self.ensure_schema()
            return await asyncio.get_running_loop().run_in_executor(thread, transaction, work)

    def _read_sync(self, read: Callable[[sa.Connection], T]) -> T:
        assert self.thread_engine is not None
        with self.thread_engine.connect() as conn:
            conn = conn.execution_options(cds_sqlite_begin="DEFERRED")  # a WAL snapshot, no write lock
            with conn.begin():
                return read(conn)


# --------------------------------------------------------------------------------------------------- helpers

def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)


def _describe(exc: BaseException) -> str:
    """Exception class names (and SQLSTATE) only: messages may quote statement parameters, i.e. PHI."""
    orig = getattr(exc, "orig", None)
    parts = [type(exc).__name__]
    if orig is not None:
        parts.append(type(orig).__name__)
    if sqlstate := _sqlstate(exc):
        parts.append(f"sqlstate={sqlstate}")
    return "/".join(parts)


# PostgreSQL SQLSTATE classes meaning "cannot use the database now": connection exception, insufficient
# resources, operator intervention (shutdown, starting up), invalid authorization, no such database.
_OUTAGE_SQLSTATES = ("08", "53", "57", "28", "3D")


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, DisconnectionError, sa.exc.TimeoutError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            return True
        sqlstate = _sqlstate(exc)
        return bool(sqlstate and sqlstate.startswith(_OUTAGE_SQLSTATES))
    return False


def _create_engine(url: str, *, busy_timeout_s: float, connect_timeout_s: float) -> AsyncEngine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    common: dict[str, Any] = {"hide_parameters": True}  # exception texts must not quote PHI
    if backend == "sqlite":
        database = parsed.database or ""
        memory = database in ("", ":memory:") or "mode=memory" in database
        if not memory:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_s}}
        if memory:
            kwargs["poolclass"] = StaticPool
        engine = create_async_engine(parsed, **common, **kwargs)
        _configure_sqlite(engine.sync_engine, busy_timeout_ms=int(busy_timeout_s * 1000), wal=not memory)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "asyncpg":
            parsed = parsed.set(drivername="postgresql+asyncpg")
        return create_async_engine(
            parsed, **common, pool_size=5, max_overflow=10, pool_timeout=10, pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"timeout": connect_timeout_s, "command_timeout": 30,
                          "server_settings": {"application_name": "mesotherapy-cds"}})
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r} (use sqlite or postgresql)")


def _create_thread_engine(engine: AsyncEngine, *, busy_timeout_s: float) -> sa.Engine | None:
    """For a SQLite file, a synchronous engine on the same file for the store's threads: the issued cards'
    (cards.py) and `Database.run_writing`'s and `Database.run_reading`'s, a connection each; None for PostgreSQL
    (asyncpg needs no thread) and in-memory SQLite (one connection only)."""
    if engine.dialect.name != "sqlite" or isinstance(engine.pool, StaticPool):
        return None
    writer = sa.create_engine(engine.url.set(drivername="sqlite+pysqlite"), hide_parameters=True,
                              pool_size=3, max_overflow=0,
                              connect_args={"timeout": busy_timeout_s, "check_same_thread": False})
    _configure_sqlite(writer, busy_timeout_ms=int(busy_timeout_s * 1000), wal=True)
    return writer


def _configure_sqlite(engine: sa.Engine, *, busy_timeout_ms: int, wal: bool) -> None:
    """Pragmas on every connection; transactions start with BEGIN IMMEDIATE (or the `cds_sqlite_begin`
    execution option)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the sqlite3 module, issues BEGIN
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")  # every commit is on disk before it returns
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for it): a read-then-write
        # transaction can then never fail with SQLITE_BUSY at its first write. Reads ask for DEFERRED.
        mode = conn.get_execution_options().get("cds_sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")
