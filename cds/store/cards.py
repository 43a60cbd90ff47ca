"""Issued cards: what is recorded of each card, and the one sink every card goes through.

The sink writes a batch with one `INSERT .. ON CONFLICT (uuid) DO NOTHING` executed over all its rows through
the driver's `executemany` (SQLAlchemy's `conn.execute(insert, rows)`), in one transaction: a card uuid recorded
again is ignored. Two implementations of `CardSink`, chosen by `card_sink()`:

- `ThreadCardSink` (a SQLite file): a thread of its own, on a connection of its own. Under load the event loop
  holds the GIL nearly all the time, and a thread waits about 10 ms for it each time it comes back from SQLite:
  through aiosqlite a batch came back a dozen times or more, and the waiting thread's wake-ups cost the event
  loop ~40 us of futex calls a request. Here a batch is one call into sqlite3's `executemany` (a loop in C).
- `AsyncCardSink` (PostgreSQL through asyncpg, whose `executemany` pipelines the rows; in-memory SQLite, which has
  a single connection): a write transaction on the store's async engine.

Either way the cards come from the audit writer (writer.py), off the hook's request path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
import sqlalchemy as sa

from .engine import Database
from .tables import issued_cards, utc


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


def card_rows(cards: Sequence[IssuedCard]) -> list[dict[str, Any]]:
    """Rows for the INSERT; a naive `issued_at` raises ValueError here, before anything is written."""
    return [{"uuid": c.uuid, "rule_id": c.rule_id, "rule_version": int(c.rule_version), "indicator": c.indicator,
             "hook": c.hook, "hook_instance": c.hook_instance, "patient_pseudonym": c.patient_pseudonym,
             "issued_at": utc(c.issued_at), "suggestion_uuids": orjson.dumps(list(c.suggestion_uuids)).decode(),
             "repeat_key": c.repeat_key, "silent": bool(c.silent)} for c in cards]


class CardSink(Protocol):
    async def write(self, cards: Sequence[IssuedCard]) -> None:
        """Persist issued cards, committed when it returns (a card uuid recorded again is ignored)."""

    def close(self) -> None:
        """Finish a batch being written, then release what the sink holds."""


def card_sink(db: Database) -> CardSink:
    return ThreadCardSink(db, db.card_writer) if db.card_writer is not None else AsyncCardSink(db)


def _insert(db: Database) -> Any:
    return db.insert(issued_cards).on_conflict_do_nothing(index_elements=[issued_cards.c.uuid])


class AsyncCardSink:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert = _insert(db)

    async def write(self, cards: Sequence[IssuedCard]) -> None:
        if not cards:
            return
        rows = card_rows(cards)
        async with self._db.writing("record_cards") as conn:
            await conn.execute(self._insert, rows)

    def close(self) -> None:
        pass


class ThreadCardSink:
    def __init__(self, db: Database, writer: sa.Engine) -> None:
        self._db = db
        self._writer = writer  # BEGIN IMMEDIATE like the store's engine (engine._configure_sqlite)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cds-card-writer")  # its thread starts on use
        self._insert = _insert(db)

    async def write(self, cards: Sequence[IssuedCard]) -> None:
        if not cards:
            return
        rows = card_rows(cards)
        async with self._db.guard("record_cards"):
            await self._db.ensure_schema()
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self._writer.begin() as conn:
            conn.execute(self._insert, rows)

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # a batch being written is finished first
