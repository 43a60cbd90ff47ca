"""Issued cards: what is recorded of each card, and the one sink every card goes through.

The sink writes a batch with one `INSERT .. ON CONFLICT (uuid) DO NOTHING` executed over all its rows through
the driver's `executemany`, in one transaction: a card uuid recorded again is ignored (see `_CardInsert`).
Two implementations of `CardSink`, chosen by `card_sink()`:

- `ThreadCardSink` (a SQLite file): a thread of its own, on a connection of its own. Under load the event loop
  holds the GIL nearly all the time, and a thread waits for it each time it comes back from SQLite: through
  aiosqlite a batch came back a dozen times or more, and the waiting thread's wake-ups cost the event loop futex
  calls on every request (bench/README.md, "Measurements behind the code"). Here a batch is one call into
  sqlite3's `executemany` (a loop in C).
- `AsyncCardSink` (PostgreSQL through asyncpg, whose `executemany` pipelines the rows; in-memory SQLite, which has
  a single connection): a write transaction on the store's async engine.

Either way the cards come from the audit writer (writer.py), off the hook's request path.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
import sqlalchemy as sa

from .engine import Database
from .tables import issued_cards, utc


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ sets each field by object.__setattr__, slowly
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


class CardSink(Protocol):
    async def write(self, cards: Sequence[IssuedCard]) -> None:
        """Persist issued cards, committed when it returns (a card uuid recorded again is ignored)."""

    def close(self) -> None:
        """Finish a batch being written, then release what the sink holds."""


def card_sink(db: Database) -> CardSink:
    return ThreadCardSink(db, db.thread_engine) if db.thread_engine is not None else AsyncCardSink(db)


class _CardInsert:
    """The sink's statement: `INSERT INTO issued_cards (...) VALUES (...) ON CONFLICT (uuid) DO NOTHING`, built
    and compiled by SQLAlchemy once, executed unchanged through the driver's `executemany` over tuples in the
    compiled parameter order. Each value goes through its column type's bind processor (the same functions
    SQLAlchemy's own `execute(insert, rows)` calls per row), `issued_at` once per distinct time: the cards of a
    hook call share theirs. Against `conn.execute(insert, rows)` this saves SQLAlchemy's per-row parameter
    handling: on SQLite, GIL time the writer thread takes from the event loop (bench/store_cards.py; bench/README.md,
    "Measurements behind the code")."""

    def __init__(self, db: Database) -> None:
        dialect = db.engine_dialect
        insert = db.insert(issued_cards).on_conflict_do_nothing(index_elements=[issued_cards.c.uuid])
        compiled = insert.compile(dialect=dialect, column_keys=[c.name for c in issued_cards.c])
        self.sql = str(compiled)
        self.columns = [str(name) for name in compiled.positiontup or ()]
        if sorted(self.columns) != sorted(c.name for c in issued_cards.c):
            raise RuntimeError(f"the issued-cards INSERT binds {self.columns}, not every column once")
        self._time = issued_cards.c.issued_at.type.dialect_impl(dialect).bind_processor(dialect) or _same
        self._processors = {c.name: p for c in issued_cards.c if c.name != "issued_at"
                            if (p := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None}
        self._in_order = operator.itemgetter(*self.columns)  # a row's values as the tuple the statement binds

    def rows(self, cards: Sequence[IssuedCard]) -> list[tuple[Any, ...]]:
        """The parameters; a naive `issued_at` raises ValueError here, before anything is written."""
        times: dict[datetime, Any] = {}
        processors = self._processors
        out = []
        for c in cards:
            if (issued_at := times.get(c.issued_at)) is None:
                issued_at = times[c.issued_at] = self._time(utc(c.issued_at))
            row = {"uuid": c.uuid, "rule_id": c.rule_id, "rule_version": int(c.rule_version),
                   "indicator": c.indicator, "hook": c.hook, "hook_instance": c.hook_instance,
                   "patient_pseudonym": c.patient_pseudonym, "issued_at": issued_at,
                   "suggestion_uuids": orjson.dumps(list(c.suggestion_uuids)).decode(),
                   "repeat_key": c.repeat_key, "silent": bool(c.silent)}
            for name, process in processors.items():
                row[name] = process(row[name])
            out.append(self._in_order(row))
        return out


def _same(value: Any) -> Any:
    return value


class AsyncCardSink:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert = _CardInsert(db)

    async def write(self, cards: Sequence[IssuedCard]) -> None:
        if not cards:
            return
        rows = self._insert.rows(cards)
        async with self._db.writing("record_cards") as conn:
            await conn.exec_driver_sql(self._insert.sql, rows)

    def close(self) -> None:
        pass


class ThreadCardSink:
    def __init__(self, db: Database, writer: sa.Engine) -> None:
        self._db = db
        self._writer = writer  # BEGIN IMMEDIATE like the store's engine (engine._configure_sqlite)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cds-card-writer")  # its thread starts on use
        self._insert = _CardInsert(db)

    async def write(self, cards: Sequence[IssuedCard]) -> None:
        if not cards:
            return
        rows = self._insert.rows(cards)
        async with self._db.guard("record_cards"):
            await self._db.ensure_schema()
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        with self._writer.begin() as conn:  # one transaction, one fsync, for the batch
            conn.exec_driver_sql(self._insert.sql, rows)

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # a batch being written is finished first
