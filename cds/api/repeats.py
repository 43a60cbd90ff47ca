"""No repeated interruption (issue 16): cards answered with feedback are not shown again at later hooks.

A card's repeat key (`screening.pipeline.repeat_key`) is the same at every hook for the same patient, rule, orders or
appointments and evidence. Feedback stores the keys of the cards it answers (`answered_cards`, in the store shared
by every worker and replica). Each process keeps the keys answered within the memory window in a dict, read from
the store again at most every `CDS_ANSWERED_CARD_REFRESH_S` (at once after feedback this process received), so a
hook call costs no database round trip: at the service's throughput a read per call cost several times the
clinical work (bench/README.md). Between two refreshes another process's answer may not be known yet: the card is
then shown once more, never hidden on a guess; a store that cannot be read hides nothing it does not already know.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import metrics
from ..knowledge.loader import KnowledgeBase
from ..store import Store, StoreError

log = logging.getLogger("cds")

OVERLAP = timedelta(seconds=60)  # re-read this much before the last refresh: a transaction may commit late


class AnsweredCards:
    """The answered-card memory of one process, refreshed from the store."""

    def __init__(self, kb: KnowledgeBase, memory: timedelta, refresh_s: float) -> None:
        self.kb = kb
        self.memory = memory
        self.refresh_s = refresh_s
        self._keys: dict[str, datetime] = {}
        self._refreshed = -math.inf  # monotonic time of the last refresh
        self._read_since: datetime | None = None  # answered_at covered by the last refresh
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._counters = {rule.id: metrics.SUPPRESSED.labels(topic=rule.id) for rule in kb.rules}

    def stale(self) -> None:
        """Feedback was stored by this process: the next hook reads the store first."""
        self._refreshed = -math.inf

    async def _refresh(self, store: Store) -> None:
        async with self._lock:
            if time.monotonic() - self._refreshed < self.refresh_s:
                return  # another request refreshed while this one waited
            started, now = time.monotonic(), datetime.now(UTC)
            cutoff = now - self.memory
            since = cutoff if self._read_since is None else max(cutoff, self._read_since - OVERLAP)
            try:
                rows = await store.answered_since(since)
            except StoreError:
                self._refreshed = started  # keep what is known; retry after the interval
                return
            for key, at in rows:
                if at > self._keys.get(key, cutoff - OVERLAP):
                    self._keys[key] = at
            self._keys = {k: at for k, at in self._keys.items() if at >= cutoff}
            self._read_since, self._refreshed = now, started

    async def without_answered(self, store: Store, hook: str, cards: list[dict[str, Any]],
                               keys: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """The cards (and their keys) left once those answered within the memory window are taken out."""
        if time.monotonic() - self._refreshed >= self.refresh_s:
            await self._refresh(store)
        if not self._keys:
            return cards, keys
        now = datetime.now(UTC)
        cutoff = now - self.memory
        answered = {k for k in keys if (at := self._keys.get(k)) is not None and at >= cutoff}
        if not answered:
            return cards, keys
        kept_cards, kept_keys, gone = [], [], []
        for card, key in zip(cards, keys, strict=True):
            if key in answered:
                topic = card["source"]["topic"]["code"]
                self._counters[topic].inc()
                gone.append((topic, self.kb.by_id[topic].version, hook))
            else:
                kept_cards.append(card)
                kept_keys.append(key)
        task = asyncio.ensure_future(self._count(store, gone, now))  # the answer never waits for the count
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return kept_cards, kept_keys

    @staticmethod
    async def _count(store: Store, rows: list[tuple[str, int, str]], at: datetime) -> None:
        try:
            await store.record_suppressed(rows, at)
        except StoreError:
            log.warning("suppressed cards not counted in the store (counted in the metrics)")

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
