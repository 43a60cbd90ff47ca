"""Issued cards go to the audit store in the background, in batches, so no hook answer waits for the database.

A card is in memory for at most `interval_s` plus one write before it is stored; `flush()` (called before feedback
is checked against the issued cards, and at shutdown) writes whatever is pending. A failing store is logged and
counted by the store itself; the cards were already answered.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from .store import IssuedCard, Store

log = logging.getLogger("cds.audit")


class AuditWriter:
    def __init__(self, store: Store, *, interval_s: float = 0.05, batch_size: int = 500,
                 max_pending: int = 100_000) -> None:
        self._store = store
        self._interval = interval_s
        self._batch = batch_size
        self._max_pending = max_pending
        self._pending: list[IssuedCard] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, cards: list[IssuedCard]) -> None:
        """Queue cards for writing; never blocks, never raises."""
        if len(self._pending) + len(cards) > self._max_pending:
            log.error("audit backlog over %d cards; dropping the oldest", self._max_pending)
            del self._pending[: len(cards)]
        self._pending.extend(cards)
        self._wake.set()

    async def flush(self) -> None:
        """Write everything submitted so far (waits for a write already under way).

        Cards submitted while it writes wait for the next flush: under steady load, writing until nothing was
        pending would never end, and the writer would never pause for `interval_s`.
        """
        async with self._lock:
            pending, self._pending = self._pending, []
            for start in range(0, len(pending), self._batch):
                batch = pending[start:start + self._batch]
                try:
                    await self._store.record_cards(batch)
                except Exception as exc:  # noqa: BLE001 - logged and counted; the cards were already answered
                    log.error("%d issued cards not recorded: %s", len(batch), type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._interval)  # let a batch gather
            await asyncio.shield(self.flush())  # a shutdown must not cancel a batch half written
