"""`Store`: the audit store's one object, what its callers use. Each concern is in its own module (engine.py for
the database, cards.py, feedback.py, replay.py, retention.py); this class puts them behind one interface."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import feedback as _feedback
from . import retention
from .cards import CardSink, IssuedCard
from .engine import Database
from .feedback import IN_CHUNK, FeedbackEntry
from .replay import ReplayCache


class Store(Database):
    """Open with `await Store.open(url)`; safe to share across tasks; one per process (each has a pool)."""

    def __init__(self, engine: AsyncEngine, thread_engine: sa.Engine | None = None) -> None:
        super().__init__(engine, thread_engine)
        self._cards = CardSink(self)
        self._replay = ReplayCache(self)

    async def close(self) -> None:
        self._cards.close()  # a batch being written is finished first
        await super().close()

    async def record_cards(self, cards: Sequence[IssuedCard]) -> None:
        """Persist issued cards (a card uuid recorded again is ignored)."""
        await self._cards.write(cards)

    async def record_feedback(self, entries: Sequence[FeedbackEntry]) -> int:
        """Persist a batch of feedback, all or nothing; returns how many entries were new (see feedback.py)."""
        return await _feedback.record_feedback(self, entries)

    async def known_cards(self, uuids: Iterable[str]) -> set[str]:
        return await _feedback.known_cards(self, uuids)

    async def answered_since(self, since: datetime) -> list[tuple[str, datetime]]:
        return await _feedback.answered_since(self, since)

    async def record_suppressed(self, rows: Sequence[tuple[str, int, str]], at: datetime) -> None:
        await _feedback.record_suppressed(self, rows, at)

    async def summary(self, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
        return await _feedback.summary(self, since, until)

    async def weekly(self, since: datetime | None = None, until: datetime | None = None,
                     rule: str | None = None) -> list[dict[str, Any]]:
        return await _feedback.weekly(self, since, until, rule)

    async def claim_jti(self, key: str, expires_at: float) -> bool:
        """Claim a token id until `expires_at` (Unix seconds): True the first time, False while it is claimed."""
        return await self._replay.claim(key, expires_at)

    async def claim(self, key: str, expires_at: float) -> bool:
        """`ReplayCache` protocol (cds.security): same as `claim_jti`."""
        return await self._replay.claim(key, expires_at)

    async def prune(self, before: datetime, *, batch: int = IN_CHUNK, pause_s: float = 0.01) -> int:
        """Delete the cards issued before `before`, with the feedback on them; returns how many cards."""
        return await retention.prune(self, before, batch=batch, pause_s=pause_s)
