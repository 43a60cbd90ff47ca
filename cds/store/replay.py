"""The JWT replay cache (`jti` claims) in the store's database, shared by every worker and replica."""

from __future__ import annotations

import time

import sqlalchemy as sa

from .engine import Database
from .tables import jwt_replay

PURGE_INTERVAL_S = 60.0  # expired rows are deleted at most this often per process


class ReplayCache:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._last_purge = 0.0

    async def claim(self, key: str, expires_at: float) -> bool:
        """Claim a token id until `expires_at` (Unix seconds): True the first time, False while it is claimed.

        An expired claim can be claimed again; the claim is one `INSERT .. ON CONFLICT DO UPDATE .. WHERE
        expired`, so two replicas racing for the same key cannot both win.
        """
        now = time.time()
        insert = self._db.insert(jwt_replay).values(key=key, expires_at=float(expires_at))
        stmt = insert.on_conflict_do_update(
            index_elements=[jwt_replay.c.key], set_={"expires_at": insert.excluded.expires_at},
            where=jwt_replay.c.expires_at <= now,
        ).returning(jwt_replay.c.key)
        async with self._db.writing("claim_jti") as conn:
            if now - self._last_purge >= PURGE_INTERVAL_S:
                await conn.execute(sa.delete(jwt_replay).where(jwt_replay.c.expires_at <= now))
                self._last_purge = now
            return (await conn.execute(stmt)).first() is not None
