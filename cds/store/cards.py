"""Issued cards: what is recorded of each card, and the one sink every card goes through.

The sink writes a batch in one transaction with one `INSERT .. ON CONFLICT (uuid) DO NOTHING`: a card uuid
recorded again is ignored (see `_CardInsert`). On PostgreSQL the statement runs over the batch's rows through the
driver's `executemany`. On SQLite the whole batch is one parameter, a JSON array of rows, which the statement reads
with `json_each`: one step of SQLite for the batch. Through `executemany`, sqlite3 let go of the GIL for each row's
step and then waited to get it back, up to the interpreter's 5 ms switch interval while the event loop held it:
under sustained load a batch took seconds, the cards waiting grew without bound towards the drop limit
(`audit_max_pending`), and a crash lost them all. Now a batch waits for the GIL a few times (begin, insert,
commit), and the cards waiting stay a few writer intervals' worth (bench/README.md, "Measurements behind the
code"). A SQLite built without its JSON functions (before 3.38 they were a build option) gets `executemany`.

`CardSink` writes through `Database.run_writing`. In a SQLite file it runs on a thread of the sink's own: a JWT
replay claim, which a hook call awaits, never queues behind a card batch on the store's write thread (SQLite's
write lock is still one, held for a batch's few milliseconds). On PostgreSQL (asyncpg's `executemany` pipelines
the rows) and in-memory SQLite it runs on the store's async engine. The cards come from the audit writer
(writer.py), off the hook's request path.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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


class _CardInsert:
    """The sink's statement and its parameters, built and compiled by SQLAlchemy once.

    Rows are tuples in the order of `columns`; each value goes through its column type's bind processor (the same
    functions SQLAlchemy's own `execute(insert, rows)` calls per row), `issued_at` once per distinct time: the
    cards of a hook call share theirs. Against `conn.execute(insert, rows)` this saves SQLAlchemy's per-row
    parameter handling, event-loop time (bench/store_cards.py; bench/README.md, "Measurements behind the code").

    - `json_rows` (SQLite with its JSON functions): `INSERT INTO issued_cards (...) SELECT json_extract(value,
      '$[0]'), ... FROM json_each(?) WHERE 1 = 1 ON CONFLICT (uuid) DO NOTHING`, executed once with the rows as one
      JSON text. `json_extract` gives each value back with the type it was bound with (text, integer, null), so
      the stored rows are those `executemany` stores (tests/store/test_store.py checks both ways).
    - otherwise: `INSERT INTO issued_cards (...) VALUES (...) ON CONFLICT (uuid) DO NOTHING` through
      `executemany`, over the list of rows.
    """

    def __init__(self, db: Database) -> None:
        dialect = db.engine_dialect
        self.columns = [c.name for c in issued_cards.c]
        self.json_rows = dialect.name == "sqlite" and sqlite_json()
        if self.json_rows:
            each = sa.func.json_each(sa.bindparam("rows")).table_valued("value")
            select = sa.select(*(sa.func.json_extract(each.c.value, sa.literal_column(f"'$[{i}]'"))
                                 for i in range(len(self.columns))))
            # The WHERE: an upsert after a SELECT needs one, or SQLite reads ON as a join's (its INSERT docs).
            insert = db.insert(issued_cards).from_select(self.columns, select.where(sa.true()))
            compiled = insert.on_conflict_do_nothing(index_elements=[issued_cards.c.uuid]).compile(dialect=dialect)
            if list(compiled.positiontup or ()) != ["rows"]:
                raise RuntimeError(f"the issued-cards INSERT binds {compiled.positiontup}, not the rows alone")
        else:
            insert = db.insert(issued_cards).on_conflict_do_nothing(index_elements=[issued_cards.c.uuid])
            compiled = insert.compile(dialect=dialect, column_keys=self.columns)
            if list(compiled.positiontup or ()) != self.columns:
                raise RuntimeError(f"the issued-cards INSERT binds {compiled.positiontup}, not {self.columns}")
        self.sql = str(compiled)
        self._time = issued_cards.c.issued_at.type.dialect_impl(dialect).bind_processor(dialect) or _same
        self._processors = {c.name: p for c in issued_cards.c if c.name != "issued_at"
                            if (p := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None}
        self._in_order = operator.itemgetter(*self.columns)  # a row's values as the tuple the statement binds

    def rows(self, cards: Sequence[IssuedCard]) -> list[tuple[Any, ...]]:
        """The rows; a naive `issued_at` raises ValueError here, before anything is written."""
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

    def parameters(self, cards: Sequence[IssuedCard]) -> tuple[str] | list[tuple[Any, ...]]:
        """What `exec_driver_sql(self.sql, ...)` takes for these cards: the rows as one JSON text, or the rows."""
        rows = self.rows(cards)
        return (orjson.dumps(rows).decode(),) if self.json_rows else rows


@functools.cache
def sqlite_json() -> bool:
    """Has the SQLite that sqlite3 links its JSON functions? (Built in since 3.38; a build option before.)"""
    try:
        with closing(sqlite3.connect(":memory:")) as conn:
            row = conn.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[7]]')").fetchone()
    except sqlite3.Error:
        return False
    return bool(row == (7,))


def _same(value: Any) -> Any:
    return value


class CardSink:
    """Where every issued card is written: `write` a batch, committed when it returns (a card uuid recorded again
    is ignored); `close` finishes a batch being written."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert = _CardInsert(db)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cds-card-writer") \
            if db.thread_engine is not None else None  # its thread starts on use

    async def write(self, cards: Sequence[IssuedCard]) -> None:
        if not cards:
            return
        sql, parameters = self._insert.sql, self._insert.parameters(cards)

        def insert(conn: sa.Connection) -> None:  # one transaction, one fsync, for the batch
            conn.exec_driver_sql(sql, parameters)

        await self._db.run_writing("record_cards", insert, thread=self._thread)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)  # a batch being written is finished first
