"""The JWT replay cache (`jti` claims) in the store's database, shared by every worker and replica.

Claims are written together (a group commit): a claim made while a write is under way waits for the next write,
which takes every claim pending by then in one transaction. With one transaction per claim, every hook call in
production waited for its own commit, one after another, and a process answered about 150-190 hook calls a
second under load, whatever the CPU (bench/README.md, "Measurements behind the code"). A claim still returns
only once its row is committed.

The write is a `Database.run_writing` transaction: in a SQLite file on the store's write thread, not through
aiosqlite (engine.py says why).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa

from .engine import Database
from .tables import jwt_replay

PURGE_INTERVAL_S = 60.0  # expired rows are deleted at most this often per process
MAX_BATCH = 500  # claims per INSERT (two parameters each: far below SQLite's limit of 32,766)


class ReplayCache:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._last_purge = 0.0
        self._pending: dict[str, tuple[float, asyncio.Future[bool]]] = {}  # key -> (expires_at, its answer)
        self._writer: asyncio.Task[None] | None = None

    async def claim(self, key: str, expires_at: float) -> bool:
        """Claim a token id until `expires_at` (Unix seconds): True the first time, False while it is claimed.

        An expired claim can be claimed again; the claim is an `INSERT .. ON CONFLICT DO UPDATE .. WHERE
        expired`, so two replicas racing for the same key cannot both win. The same key twice in one batch: the
        second is refused at once (the first is being claimed). Raises what the write raised (StoreError).
        """
        if key in self._pending:
            return False
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[key] = (float(expires_at), answer)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending(), name="jti-claims")
        return await asyncio.shield(answer)  # a cancelled caller leaves the batch's answer to the others

    async def _write_pending(self) -> None:
        batch: dict[str, tuple[float, asyncio.Future[bool]]] = {}
        try:
            while self._pending:
                batch = dict(list(self._pending.items())[:MAX_BATCH])
                for key in batch:
                    del self._pending[key]
                try:
                    claimed = await self._insert(batch)
                except Exception as exc:  # noqa: BLE001 - every claim of the batch gets the store's error
                    for _, answer in batch.values():
                        answer.set_exception(exc)
                        answer.exception()  # retrieved here too: a caller cancelled meanwhile never reads it
                    continue
                for key, (_, answer) in batch.items():
                    answer.set_result(key in claimed)
        finally:
            self._writer = None
            for _, answer in [*batch.values(), *self._pending.values()]:  # cancelled (shutdown): no answer
                if not answer.done():
                    answer.cancel()
            self._pending.clear()

    async def _insert(self, batch: dict[str, tuple[float, Any]]) -> set[str]:
        now = time.time()
        purge = now - self._last_purge >= PURGE_INTERVAL_S
        # In key order: two replicas writing overlapping batches take the rows' locks in the same order. A deadlock
        # would fail one batch, and its claims would fall back to that process's own memory.
        rows = [{"key": k, "expires_at": e} for k, (e, _) in sorted(batch.items())]

        def write(conn: sa.Connection) -> set[str]:  # the statement too is built off the event loop
            if purge:
                conn.execute(sa.delete(jwt_replay).where(jwt_replay.c.expires_at <= now))
            insert = self._db.insert(jwt_replay).values(rows)
            return {row[0] for row in conn.execute(insert.on_conflict_do_update(
                index_elements=[jwt_replay.c.key], set_={"expires_at": insert.excluded.expires_at},
                where=jwt_replay.c.expires_at <= now,
            ).returning(jwt_replay.c.key))}

        claimed = await self._db.run_writing("claim_jti", write)
        if purge:
            self._last_purge = now
        return claimed
