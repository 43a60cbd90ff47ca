"""No repeated interruption (issue 16): cards answered with feedback are not shown again at later hooks.

A card's repeat key (`screening.pipeline.repeat_key`) is the same at every hook for the same patient, rule, orders or
appointments and evidence. Feedback stores the keys of the cards it answers (`answered_cards`, in the store shared
by every worker and replica). Each process keeps the keys answered within the memory window in a dict, which a
background task rereads from the store every `CDS_ANSWERED_CARD_REFRESH_S`; a hook call reads the store itself only
before the first read and after feedback this process received. So a hook call costs no database round trip: at the
service's throughput a read per call cost several times the clinical work, and a periodic read awaited by the hook
call that found the memory old held every call in flight behind it for 70-200 ms under load (bench/README.md).
Between two refreshes another process's answer may not be known yet: the card is then shown once more, never hidden
on a guess; a store that cannot be read hides nothing it does not already know.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
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
        self._read_since: datetime | None = None  # answered_at covered by the last refresh
        self._generation = 0  # bumped by stale(): feedback this process stored since
        self._read_generation = -1  # the generation the last read started at (-1: never read)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._counters = {rule.id: metrics.SUPPRESSED.labels(topic=rule.id) for rule in kb.rules}

    def start(self, store: Store) -> None:
        """Reread the store now and every `refresh_s` in the background (with `refresh_s` 0, every hook reads)."""
        if self.refresh_s > 0:
            self._task = asyncio.create_task(self._refresh_forever(store), name="answered-cards")

    def stale(self) -> None:
        """Feedback was stored by this process: the next hook reads the store first."""
        self._generation += 1

    async def _refresh_forever(self, store: Store) -> None:
        while True:
            try:
                await self._refresh(store, force=True)
            except Exception:  # the task must outlive a bug in one read; hooks still read after stale()
                log.exception("answered cards not reread")
            await asyncio.sleep(self.refresh_s)

    async def _refresh(self, store: Store, force: bool = False) -> None:
        async with self._lock:
            generation = self._generation
            if not force and self.refresh_s > 0 and self._read_generation == generation:
                return  # another call read the store, after the feedback, while this one waited
            now = datetime.now(UTC)
            cutoff = now - self.memory
            since = cutoff if self._read_since is None else max(cutoff, self._read_since - OVERLAP)
            try:
                rows = await store.answered_since(since)
            except StoreError:
                self._read_generation = generation  # keep what is known; the background task retries
                return
            for key, at in rows:
                if at > self._keys.get(key, cutoff - OVERLAP):
                    self._keys[key] = at
            self._keys = {k: at for k, at in self._keys.items() if at >= cutoff}
            self._read_since, self._read_generation = now, generation

    async def without_answered(self, store: Store, hook: str, cards: list[dict[str, Any]],
                               keys: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """The cards (and their keys) left once those answered within the memory window are taken out."""
        if self._read_generation != self._generation or self.refresh_s <= 0:
            await self._refresh(store)  # before the first read, after this process's feedback, or when asked to
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
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
