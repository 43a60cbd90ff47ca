"""The audit store: issued cards, clinician feedback, the review summary and the shared JWT replay cache.

One code path over SQLAlchemy 2's async engine: SQLite through aiosqlite (the embedded default, a file in
`CDS_DATA_DIR`) or PostgreSQL through asyncpg (`CDS_DATABASE_URL`). The schema is created and upgraded by
`cds.migrations` when the store opens.

Concurrency and durability:
- SQLite runs in WAL mode with `synchronous=FULL` and a busy timeout, and every write transaction starts with
  `BEGIN IMMEDIATE`, so writers from several processes queue for the write lock instead of failing, and a
  check-then-insert (unknown card uuids, replay claims) cannot be overtaken between its read and its write.
- Feedback is deduplicated by a unique key (`dedup_key`, a sha256 over the canonical card uuid, outcome,
  outcomeTimestamp in UTC, override reason and sorted accepted suggestions) with `INSERT .. ON CONFLICT DO
  NOTHING`, which is race-free on both databases.
- Every committed write is on disk when the call returns: a restart, or a killed process, loses nothing.
- Issued cards in a SQLite file are written by a thread of their own, on a connection of their own, up to
  1,000 per multi-row INSERT, each INSERT its own transaction. Under load the event loop holds the GIL nearly
  all the time, and a thread waits about 10 ms for it each time it comes back from SQLite: through aiosqlite a
  batch came back a dozen times or more, and the waiting thread's wake-ups cost the event loop ~40 us of futex
  calls a request.

Failures of the database itself raise `StoreUnavailable` (or `StoreError`), are counted in
`cds_store_errors_total{operation=...}` and logged without SQL parameters, so no PHI reaches the logs; callers
decide whether to degrade (cards are still returned when recording them fails).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from . import migrations
from ..metrics import STORE_ERRORS

log = logging.getLogger("cds.store")

Outcome = Literal["accepted", "overridden"]
OUTCOMES: tuple[str, ...] = ("accepted", "overridden")

_IN_CHUNK = 500  # uuids per `IN (...)` lookup
_CARD_ROWS = 1000  # issued cards per INSERT at most (fewer where SQLite allows fewer parameters)
_PURGE_INTERVAL_S = 60.0  # expired replay-cache rows are deleted at most this often per Store


# ---------------------------------------------------------------------------------------------- public types

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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~10 us per card, set by object.__setattr__
class IssuedCard:
    uuid: str
    rule_id: str  # the rule's topic code
    rule_version: int
    indicator: str
    hook: str
    hook_instance: str
    patient_pseudonym: str | None
    issued_at: datetime  # timezone-aware
    suggestion_uuids: list[str] = field(default_factory=list)
    repeat_key: str | None = None  # what makes it "the same card" for the answered-card memory (issue 16)
    silent: bool = False  # silent mode: computed and recorded, not returned to the EHR


@dataclass(frozen=True)
class FeedbackEntry:
    card_uuid: str
    outcome: Outcome
    outcome_timestamp: datetime  # timezone-aware
    accepted_suggestions: list[str] = field(default_factory=list)
    override_reason_code: str | None = None
    override_reason_system: str | None = None
    user_comment: str | None = None

    def dedup_key(self) -> str:
        """Identity of a feedback entry: the same entry posted again has the same key (comments don't count)."""
        canonical = [self.card_uuid, self.outcome, _utc(self.outcome_timestamp).isoformat(timespec="microseconds"),
                     self.override_reason_system or "", self.override_reason_code or "",
                     sorted(set(self.accepted_suggestions))]
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- current schema

class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored as timestamptz (PostgreSQL) or UTC text (SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()
issued_cards = sa.Table(
    "issued_cards", metadata,
    sa.Column("uuid", sa.Text, primary_key=True),
    sa.Column("rule_id", sa.Text, nullable=False),
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("indicator", sa.String(16), nullable=False),
    sa.Column("hook", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text, nullable=False),
    sa.Column("patient_pseudonym", sa.Text),
    sa.Column("issued_at", UTCDateTime, nullable=False),
    sa.Column("suggestion_uuids", sa.Text, nullable=False),
    sa.Column("repeat_key", sa.Text),
    sa.Column("silent", sa.Boolean, nullable=False, server_default=sa.false()),
)
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("card_uuid", sa.Text, sa.ForeignKey("issued_cards.uuid"), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("accepted_suggestions", sa.Text, nullable=False),
    sa.Column("override_reason_system", sa.Text),
    sa.Column("override_reason_code", sa.Text),
    sa.Column("user_comment", sa.Text),
    sa.Column("outcome_timestamp", UTCDateTime, nullable=False),
    sa.Column("dedup_key", sa.String(64), nullable=False, unique=True),
    sa.Column("received_at", UTCDateTime),
)
answered_cards = sa.Table(
    "answered_cards", metadata,
    sa.Column("repeat_key", sa.Text, primary_key=True),
    sa.Column("answered_at", UTCDateTime, nullable=False),
)
suppressed_cards = sa.Table(
    "suppressed_cards", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("rule_id", sa.Text, nullable=False),
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("hook", sa.Text, nullable=False),
    sa.Column("suppressed_at", UTCDateTime, nullable=False),
)
jwt_replay = sa.Table(
    "jwt_replay", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("expires_at", sa.Double, nullable=False),
)


# ------------------------------------------------------------------------------------------------ the store

class Store:
    """Open with `await Store.open(url)`; safe to share across tasks; one per process (each has a pool)."""

    def __init__(self, engine: AsyncEngine, card_writer: sa.Engine | None = None) -> None:
        self._engine = engine
        self._card_writer = card_writer  # SQLite files: issued cards go through this engine, in `_card_thread`
        self._card_thread = ThreadPoolExecutor(1, thread_name_prefix="cds-card-writer")  # its thread starts on use
        self._dialect = engine.dialect.name
        self._insert = pg_dialect.insert if self._dialect == "postgresql" else sqlite_dialect.insert
        # Issued cards are the one write on every hook call: their INSERT is compiled once, and rows go to the
        # driver as tuples, which takes about half the event loop's time per row of a Core executemany.
        card_insert = self._insert(issued_cards).on_conflict_do_nothing(index_elements=[issued_cards.c.uuid])
        compiled = card_insert.compile(dialect=engine.dialect)
        self._card_sql = str(compiled)
        self._card_columns = [str(name) for name in compiled.positiontup or ()]
        self._bind_issued_at = issued_cards.c.issued_at.type.bind_processor(engine.dialect) or (lambda v: v)
        self._last_purge = 0.0
        self._schema_ready = False  # set once migrations ran (or were run explicitly) in this process
        self._schema_lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, busy_timeout_s: float = 30.0,
                   connect_timeout_s: float = 5.0) -> Store:
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
        store = cls(engine, _create_card_writer(engine, busy_timeout_s=busy_timeout_s))
        if migrate:
            try:
                await store.migrate()
            except BaseException:
                await store.close()
                raise
        return store

    async def migrate(self, target: int | None = None) -> int:
        """Apply pending migrations (serialised across processes); returns the schema version."""
        async with self._guard("open"):
            before, after = await migrations.upgrade(self._engine, target)
        self._schema_ready = True
        if before != after:
            log.info("store schema upgraded from version %d to %d", before, after)
        return after

    async def schema_version(self) -> int:
        async with self._guard("open"):
            return await migrations.current_version(self._engine)

    async def close(self) -> None:
        self._card_thread.shutdown(wait=True)  # a batch being written is finished first
        if self._card_writer is not None:
            self._card_writer.dispose()
        await self._engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def dialect(self) -> str:
        return self._dialect

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

    # ---- writes

    async def record_cards(self, cards: Sequence[IssuedCard]) -> None:
        """Persist issued cards (a card uuid recorded again is ignored)."""
        if not cards:
            return
        bound: dict[datetime, Any] = {}  # the cards of one hook call share their time
        rows = []
        for c in cards:
            if (issued_at := bound.get(c.issued_at)) is None:
                issued_at = bound[c.issued_at] = self._bind_issued_at(c.issued_at)
            row = {"uuid": c.uuid, "rule_id": c.rule_id, "rule_version": int(c.rule_version),
                   "indicator": c.indicator, "hook": c.hook, "hook_instance": c.hook_instance,
                   "patient_pseudonym": c.patient_pseudonym, "issued_at": issued_at,
                   "suggestion_uuids": orjson.dumps(list(c.suggestion_uuids)).decode(), "repeat_key": c.repeat_key,
                   "silent": bool(c.silent)}
            rows.append(tuple(row[name] for name in self._card_columns))
        if self._card_writer is not None:
            async with self._guard("record_cards"):
                await self._ensure_schema()
                await asyncio.get_running_loop().run_in_executor(
                    self._card_thread, self._insert_cards, self._card_writer, rows)
            return
        async with self._write("record_cards") as conn:
            await conn.exec_driver_sql(self._card_sql, rows)

    def _insert_cards(self, writer: sa.Engine, rows: list[tuple[Any, ...]]) -> None:
        """SQLite, in the card writer's thread: each chunk of rows in one INSERT, committed on its own."""
        one = "(" + ", ".join("?" * len(self._card_columns)) + ")"  # `_card_sql`'s VALUES group, once in it
        with writer.connect() as conn:
            driver: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
            parameters = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            size = max(1, min(_CARD_ROWS, parameters // len(self._card_columns)))
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                sql = self._card_sql.replace(one, ", ".join([one] * len(chunk)), 1)
                conn.exec_driver_sql(sql, tuple(value for row in chunk for value in row))

    async def record_feedback(self, entries: Sequence[FeedbackEntry]) -> int:
        """Persist a batch of feedback, all or nothing; returns how many entries were new.

        Raises `UnknownCard` (naming the first offending entry's card) before writing anything if any entry
        names a card uuid that was never issued. An entry already stored (same dedup key) is skipped.
        """
        if not entries:
            return 0
        received_at = datetime.now(UTC)
        rows: dict[str, dict[str, Any]] = {}
        for e in entries:
            if e.outcome not in OUTCOMES:
                raise ValueError(f"feedback outcome must be one of {OUTCOMES}, not {e.outcome!r}")
            key = e.dedup_key()
            rows.setdefault(key, {
                "card_uuid": e.card_uuid, "outcome": e.outcome,
                "accepted_suggestions": json.dumps(sorted(set(e.accepted_suggestions))),
                "override_reason_system": e.override_reason_system,
                "override_reason_code": e.override_reason_code, "user_comment": e.user_comment,
                "outcome_timestamp": _utc(e.outcome_timestamp), "dedup_key": key, "received_at": received_at,
            })
        stmt = (self._insert(feedback).on_conflict_do_nothing(index_elements=[feedback.c.dedup_key])
                .returning(feedback.c.id))
        async with self._write("record_feedback") as conn:
            known = await _existing_cards(conn, {e.card_uuid for e in entries})
            for e in entries:
                if e.card_uuid not in known:
                    raise UnknownCard(e.card_uuid)
            result = await conn.execute(stmt, list(rows.values()))
            stored = len(result.all())
            await _remember_answered(conn, self._insert, {e.card_uuid for e in entries}, received_at)
            return stored

    async def answered_since(self, since: datetime) -> list[tuple[str, datetime]]:
        """Repeat keys of cards answered with feedback at or after `since`, with when (the latest answer)."""
        async with self._read("answered") as conn:
            result = await conn.execute(sa.select(answered_cards.c.repeat_key, answered_cards.c.answered_at)
                                        .where(answered_cards.c.answered_at >= since))
            return [(key, at) for key, at in result.all()]

    async def record_suppressed(self, rows: Sequence[tuple[str, int, str]], at: datetime) -> None:
        """Count cards not shown again because they were answered: (rule id, rule version, hook) each."""
        if rows:
            async with self._write("record_suppressed") as conn:
                await conn.execute(sa.insert(suppressed_cards), [
                    {"rule_id": r, "rule_version": int(v), "hook": h, "suppressed_at": at} for r, v, h in rows])

    async def claim_jti(self, key: str, expires_at: float) -> bool:
        """Claim a token id until `expires_at` (Unix seconds): True the first time, False while it is claimed.

        Shared by every worker and replica using this database; an expired claim can be claimed again.
        """
        now = time.time()
        insert = self._insert(jwt_replay).values(key=key, expires_at=float(expires_at))
        stmt = insert.on_conflict_do_update(
            index_elements=[jwt_replay.c.key], set_={"expires_at": insert.excluded.expires_at},
            where=jwt_replay.c.expires_at <= now,
        ).returning(jwt_replay.c.key)
        async with self._write("claim_jti") as conn:
            if now - self._last_purge >= _PURGE_INTERVAL_S:
                await conn.execute(sa.delete(jwt_replay).where(jwt_replay.c.expires_at <= now))
                self._last_purge = now
            return (await conn.execute(stmt)).first() is not None

    async def prune(self, before: datetime, *, batch: int = _IN_CHUNK, pause_s: float = 0.01) -> int:
        """Delete the cards issued before `before`, with the feedback on them; returns how many cards.

        Audit retention: a batch of `batch` cards per short transaction, with a pause between batches, so the
        hooks' own writes (and on SQLite the single write lock) are never held up for long.
        """
        total = 0
        while True:
            async with self._write("prune") as conn:
                uuids = list((await conn.execute(
                    sa.select(issued_cards.c.uuid).where(issued_cards.c.issued_at < _utc(before))
                    .order_by(issued_cards.c.issued_at).limit(batch))).scalars())
                if uuids:
                    await conn.execute(sa.delete(feedback).where(feedback.c.card_uuid.in_(uuids)))
                    await conn.execute(sa.delete(issued_cards).where(issued_cards.c.uuid.in_(uuids)))
            total += len(uuids)
            if len(uuids) < batch:
                return total
            await asyncio.sleep(pause_s)

    async def claim(self, key: str, expires_at: float) -> bool:
        """`ReplayCache` protocol: same as `claim_jti`."""
        return await self.claim_jti(key, expires_at)

    # ---- reads

    async def summary(self, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
        """Per rule and version: cards issued (returned), silent (recorded, not returned), feedback accepted and
        overridden, and override reason counts; over the cards issued in [since, until) when given."""
        c, f = issued_cards, feedback
        joined = f.join(c, f.c.card_uuid == c.c.uuid)
        period = _period(since, until, self._dialect)
        async with self._read("summary") as conn:
            issued = (await conn.execute(
                sa.select(c.c.rule_id, c.c.rule_version, c.c.silent, sa.func.count()).where(*period)
                .group_by(c.c.rule_id, c.c.rule_version, c.c.silent))).all()
            outcomes = (await conn.execute(
                sa.select(c.c.rule_id, c.c.rule_version, f.c.outcome, sa.func.count()).select_from(joined)
                .where(*period).group_by(c.c.rule_id, c.c.rule_version, f.c.outcome))).all()
            reasons = (await conn.execute(
                sa.select(c.c.rule_id, c.c.rule_version, f.c.override_reason_code, sa.func.count())
                .select_from(joined)
                .where(f.c.outcome == "overridden", f.c.override_reason_code.is_not(None), *period)
                .group_by(c.c.rule_id, c.c.rule_version, f.c.override_reason_code))).all()
            suppressed = (await conn.execute(
                sa.select(suppressed_cards.c.rule_id, suppressed_cards.c.rule_version, sa.func.count())
                .group_by(suppressed_cards.c.rule_id, suppressed_cards.c.rule_version))).all()

        rules: dict[tuple[str, int], dict[str, Any]] = {}

        def entry(rule: str, version: int) -> dict[str, Any]:
            return rules.setdefault((rule, version), {"rule": rule, "version": str(version), "issued": 0, "silent": 0,
                                                      "accepted": 0, "overridden": 0, "override_reasons": {},
                                                      "suppressed": 0})

        for rule, version, silent, count in issued:
            entry(rule, version)["silent" if silent else "issued"] += int(count)
        for rule, version, outcome, count in outcomes:
            entry(rule, version)[outcome] = int(count)
        for rule, version, code, count in sorted(reasons, key=lambda r: (-r[3], r[2])):
            entry(rule, version)["override_reasons"][code] = int(count)
        for rule, version, count in suppressed:  # answered cards not shown again at a later hook
            entry(rule, version)["suppressed"] = int(count)
        return {"rules": [rules[k] for k in sorted(rules)]}

    async def weekly(self, since: datetime | None = None, until: datetime | None = None,
                     rule: str | None = None) -> list[dict[str, Any]]:
        """Per ISO week (Monday, UTC) of issue: cards issued, silent, accepted and overridden (one rule or all)."""
        c, f = issued_cards, feedback
        if self._dialect == "postgresql":
            day: Any = sa.cast(sa.func.timezone("UTC", c.c.issued_at), sa.Date)
        else:
            day = sa.func.date(c.c.issued_at)  # stored as UTC text
        where = [*_period(since, until, self._dialect)] + ([c.c.rule_id == rule] if rule else [])
        async with self._read("summary") as conn:
            issued = (await conn.execute(
                sa.select(day, c.c.silent, sa.func.count()).where(*where).group_by(day, c.c.silent))).all()
            outcomes = (await conn.execute(
                sa.select(day, f.c.outcome, sa.func.count()).select_from(f.join(c, f.c.card_uuid == c.c.uuid))
                .where(*where).group_by(day, f.c.outcome))).all()
        weeks: dict[date, dict[str, Any]] = {}

        def week(value: Any) -> dict[str, Any]:
            d = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
            monday = d - timedelta(days=d.weekday())
            return weeks.setdefault(monday, {"week": monday.isoformat(), "issued": 0, "silent": 0, "accepted": 0,
                                             "overridden": 0})

        for d, silent, count in issued:
            week(d)["silent" if silent else "issued"] += int(count)
        for d, outcome, count in outcomes:
            week(d)[outcome] += int(count)
        return [weeks[k] for k in sorted(weeks)]

    # ---- plumbing

    @asynccontextmanager
    async def _guard(self, operation: str) -> AsyncIterator[None]:
        try:
            yield
        except (UnknownCard, ValueError):
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            STORE_ERRORS.labels(operation=operation).inc()
            log.error("store %s failed: %s", operation, _describe(exc))
            kind = StoreUnavailable if _is_outage(exc) else StoreError
            raise kind(f"{operation}: {_describe(exc)}") from exc

    async def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            if not self._schema_ready:
                await migrations.upgrade(self._engine)
                self._schema_ready = True
                log.info("store schema brought up to date on first use")

    @asynccontextmanager
    async def _write(self, operation: str) -> AsyncIterator[AsyncConnection]:
        async with self._guard(operation):
            await self._ensure_schema()
            async with self._engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE
                yield conn

    @asynccontextmanager
    async def _read(self, operation: str) -> AsyncIterator[AsyncConnection]:
        async with self._guard(operation):
            await self._ensure_schema()
            async with self._engine.connect() as conn:
                if self._dialect == "postgresql":
                    await conn.execution_options(isolation_level="REPEATABLE READ")  # one snapshot, all queries
                else:
                    await conn.execution_options(cds_sqlite_begin="DEFERRED")  # a WAL snapshot, no write lock
                async with conn.begin():
                    yield conn


# --------------------------------------------------------------------------------------------------- helpers

def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


def _period(since: datetime | None, until: datetime | None, dialect: str) -> list[Any]:
    """Conditions on the card's issue time: since <= issued_at < until.

    SQLite keeps the time as text, with or without a fraction of a second depending on the writer, so there
    both sides are normalised by SQLite's datetime() (whole seconds) instead of compared as strings.
    """
    out = []
    column: Any = issued_cards.c.issued_at
    for bound, lower in ((since, True), (until, False)):
        if bound is None:
            continue
        value: Any = _utc(bound)
        if dialect == "sqlite":
            column = sa.func.datetime(issued_cards.c.issued_at)
            value = sa.func.datetime(sa.literal(value.replace(tzinfo=None).isoformat(sep=" "), sa.Text))
        out.append(column >= value if lower else column < value)
    return out


async def _existing_cards(conn: AsyncConnection, uuids: Iterable[str]) -> set[str]:
    wanted = sorted(set(uuids))
    found: set[str] = set()
    for i in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[i:i + _IN_CHUNK]
        result = await conn.execute(sa.select(issued_cards.c.uuid).where(  # a silent card was never shown
            issued_cards.c.uuid.in_(chunk), issued_cards.c.silent.is_(sa.false())))
        found.update(result.scalars())
    return found


async def _remember_answered(conn: AsyncConnection, insert: Any, uuids: set[str], at: datetime) -> None:
    """The repeat keys of cards just answered are remembered from `at` (a later answer renews the memory)."""
    keys: set[str] = set()
    wanted = sorted(uuids)
    for i in range(0, len(wanted), _IN_CHUNK):
        result = await conn.execute(sa.select(issued_cards.c.repeat_key).where(
            issued_cards.c.uuid.in_(wanted[i:i + _IN_CHUNK]), issued_cards.c.repeat_key.is_not(None)))
        keys.update(result.scalars())
    if keys:
        stmt = insert(answered_cards)
        await conn.execute(stmt.on_conflict_do_update(index_elements=[answered_cards.c.repeat_key],
                                                      set_={"answered_at": stmt.excluded.answered_at}),
                           [{"repeat_key": k, "answered_at": at} for k in sorted(keys)])


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


def _create_card_writer(engine: AsyncEngine, *, busy_timeout_s: float) -> sa.Engine | None:
    """For a SQLite file, a synchronous engine on the same file for the issued-cards INSERTs (see the module
    docstring); None for PostgreSQL (asyncpg needs no thread) and in-memory SQLite (one connection only)."""
    if engine.dialect.name != "sqlite" or isinstance(engine.pool, StaticPool):
        return None
    writer = sa.create_engine(engine.url.set(drivername="sqlite+pysqlite"), hide_parameters=True,
                              isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0,
                              connect_args={"timeout": busy_timeout_s, "check_same_thread": False})
    _configure_sqlite(writer, busy_timeout_ms=int(busy_timeout_s * 1000), wal=True, begin=False)
    return writer


def _configure_sqlite(engine: sa.Engine, *, busy_timeout_ms: int, wal: bool, begin: bool = True) -> None:
    """Pragmas on every connection; with `begin`, transactions start with BEGIN IMMEDIATE (or the
    `cds_sqlite_begin` execution option); without it, every statement commits on its own (the card writer)."""

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

    if not begin:
        return

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for it): a read-then-write
        # transaction can then never fail with SQLITE_BUSY at its first write. Reads ask for DEFERRED.
        mode = conn.get_execution_options().get("cds_sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")
