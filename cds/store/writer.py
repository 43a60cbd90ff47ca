"""Issued cards go to the audit store in the background, in batches, so no hook answer waits for the database.

A card is in memory for at most `interval_s` plus one write before it is stored; `flush()` (called before feedback
is checked against the issued cards, and at shutdown) writes whatever is pending. When the store is down, cards
stay pending (at most `max_pending`) and are also appended to a local spool file, which a restarted service reads
back; the writer retries every `retry_s` and writes them when the store returns. Feedback naming a card that is
still pending is held (memory and spool too) and written after its card.

`record_feedback()` is how feedback reaches the store: the cards this process issued are flushed first; a card
another worker (or replica) issued may still be in that worker's writer, so a batch naming a card the store does
not know yet waits for it, polling the store with backoff, and is stored as soon as the card is (or refused as
naming an unknown card once `card_wait_s` has passed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Sequence
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from ..metrics import AUDIT_BACKLOG, AUDIT_DROPPED
from .cards import IssuedCard
from .engine import StoreUnavailable, UnknownCard
from .feedback import FeedbackEntry
from .store import Store

log = logging.getLogger("cds.audit")


class AuditWriter:
    def __init__(self, store: Store, *, interval_s: float = 0.05, batch_size: int = 500,
                 max_pending: int = 100_000, retry_s: float = 1.0, spool: Path | None = None,
                 card_wait_s: float = 1.0) -> None:
        self._store = store
        self._card_wait = card_wait_s  # 20 writer intervals: another worker's card is stored by then
        self._interval = interval_s
        self._batch = batch_size
        self._max_pending = max_pending
        self._retry = retry_s
        self._pending: list[IssuedCard] = []
        self._pending_ids: set[str] = set()  # uuids of cards not yet stored (pending or being written)
        self._held: list[FeedbackEntry] = []  # feedback waiting for its card
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failed_at = 0.0  # monotonic time of the last failed write (0: the store is up)
        self._spool = _Spool(spool) if spool is not None else None
        self._spooled: set[str] = set()  # card uuids (and feedback keys) already in the spool file
        if self._spool is not None:
            cards, held = self._spool.load()
            for c in cards:
                if c.uuid not in self._pending_ids:
                    self._pending.append(c)
                    self._pending_ids.add(c.uuid)
            self._held.extend(held)
            self._spooled = set(self._pending_ids) | {e.dedup_key() for e in held}
            if cards or held:
                log.warning("audit spool: %d issued cards and %d feedback entries from before a restart are "
                            "pending", len(cards), len(held))
        self._gauge()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        if self._pending or self._held:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending_ids)

    def submit(self, cards: list[IssuedCard]) -> None:
        """Queue cards for writing; never blocks, never raises."""
        if len(self._pending) + len(cards) > self._max_pending:
            drop = self._pending[: len(cards)]
            log.error("audit backlog over %d cards; dropping the oldest %d", self._max_pending, len(drop))
            AUDIT_DROPPED.inc(len(drop))
            del self._pending[: len(cards)]
            for c in drop:
                self._pending_ids.discard(c.uuid)
        self._pending.extend(cards)
        for c in cards:
            self._pending_ids.add(c.uuid)
        self._wake.set()

    def pending(self, entries: Sequence[FeedbackEntry]) -> bool:
        """Does any entry name a card this process issued that is not stored yet?"""
        return any(e.card_uuid in self._pending_ids for e in entries)

    def hold(self, entries: Sequence[FeedbackEntry]) -> None:
        """Keep feedback until its cards are stored (it is written by the next successful flush)."""
        self._held.extend(entries)
        if self._spool is not None and self._failed_at:
            self._spool_now()
        self._wake.set()

    async def record_feedback(self, entries: Sequence[FeedbackEntry]) -> int | None:
        """Store a batch of feedback once the cards it names are stored; returns how many entries were new, or
        None when it is held (a card this process issued is still waiting for the store: an outage).

        Raises `UnknownCard` when a card is still unknown after `card_wait_s`, `StoreError` when the store fails.
        """
        await self.flush()  # cards this process issued a moment ago are stored first
        if self.pending(entries):
            self.hold(entries)
            return None
        try:
            return await self._store.record_feedback(entries)
        except UnknownCard:  # possibly issued by another worker whose batch is not written yet
            await self._await_cards({e.card_uuid for e in entries})
        return await self._store.record_feedback(entries)  # all there now, or it names the card still unknown

    async def _await_cards(self, uuids: set[str]) -> None:
        """Poll the store (reads: no write lock) until it has all these cards or `card_wait_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._card_wait
        delay = 0.005
        while uuids - await self._store.known_cards(uuids):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    async def flush(self) -> None:
        """Write everything submitted so far (waits for a write already under way).

        Cards submitted while it writes wait for the next flush: under steady load, writing until nothing was
        pending would never end, and the writer would never pause for `interval_s`. While the store is down,
        a flush within `retry_s` of the last failure does not try it again (it spools what is pending).
        """
        async with self._lock:
            if self._failed_at and time.monotonic() - self._failed_at < self._retry:
                if self._spool is not None:
                    self._spool_now()
                return
            pending, self._pending = self._pending, []
            for start in range(0, len(pending), self._batch):
                batch = pending[start:start + self._batch]
                try:
                    await self._store.record_cards(batch)
                except StoreUnavailable:  # an outage: keep everything not yet written, in order, and spool it
                    self._pending[:0] = pending[start:]
                    self._outage()
                    return
                except Exception as exc:  # noqa: BLE001 - not an outage: these rows will not go in on a retry
                    log.error("%d issued cards not recorded: %s", len(batch), type(exc).__name__)
                    AUDIT_DROPPED.inc(len(batch))
                for c in batch:
                    self._pending_ids.discard(c.uuid)
            await self._write_held()
            self._recovered()

    async def _write_held(self) -> None:
        held, self._held = self._held, []
        waiting = [e for e in held if e.card_uuid in self._pending_ids]  # their card is still pending
        ready = [e for e in held if e.card_uuid not in self._pending_ids]
        self._held = waiting
        for entry in ready:  # one by one: an entry naming an unknown card must not take the others with it
            try:
                await self._store.record_feedback([entry])
            except StoreUnavailable:
                self._held.append(entry)
            except UnknownCard:
                log.error("held feedback names a card that was never stored; dropped")
                AUDIT_DROPPED.inc()
            except Exception as exc:  # noqa: BLE001 - logged and counted
                log.error("held feedback not recorded: %s", type(exc).__name__)
                AUDIT_DROPPED.inc()
        if len(self._held) > len(waiting):
            self._outage()

    def _outage(self) -> None:
        if not self._failed_at:
            log.error("audit store unavailable: %d issued cards pending, kept and spooled until it returns",
                      len(self._pending_ids))
        self._failed_at = time.monotonic()
        if self._spool is not None:
            self._spool_now()

    def _recovered(self) -> None:
        if self._failed_at and not self._pending_ids and not self._held:
            log.warning("audit store back: the backlog is written")
            self._failed_at = 0.0
        if self._spool is not None and self._spooled and not self._pending_ids and not self._held:
            self._spool.clear()
            self._spooled.clear()

    def _spool_now(self) -> None:
        """Append what is pending and not yet in the spool file (one write and fsync)."""
        assert self._spool is not None
        lines: list[bytes] = []
        for c in self._pending:
            if c.uuid not in self._spooled:
                self._spooled.add(c.uuid)
                lines.append(orjson.dumps({"card": dataclasses.asdict(c)}))
        for e in self._held:
            key = e.dedup_key()
            if key not in self._spooled:
                self._spooled.add(key)
                lines.append(orjson.dumps({"feedback": dataclasses.asdict(e)}))
        if lines:
            self._spool.append(lines)

    def _gauge(self) -> None:
        """The backlog gauges read this writer's queues when scraped: nothing to do per request."""
        AUDIT_BACKLOG.labels(kind="cards").set_function(lambda: len(self._pending_ids))
        AUDIT_BACKLOG.labels(kind="feedback").set_function(lambda: len(self._held))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self._failed_at = 0.0  # one last try
        await self.flush()
        if self._spool is not None:
            if self._pending or self._held:
                self._spool_now()
            self._spool.close()

    async def _run(self) -> None:
        while True:
            if self._failed_at:  # an outage: retry on a timer, not only when new cards come in
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._retry)
            else:
                await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._interval)  # let a batch gather
            await asyncio.shield(self.flush())  # a shutdown must not cancel a batch half written


class _Spool:
    """A JSON-lines file of cards and feedback not yet stored, locked by this process (another process on the
    same directory takes `<name>.1`, `.2`, ...); fsynced on every append, emptied when the backlog is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        for n in range(16):
            candidate = path if n == 0 else path.with_name(f"{path.name}.{n}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(candidate, "a+b")  # noqa: SIM115 - held open for the life of the writer
            except OSError as exc:
                log.error("audit spool: %s cannot be opened (%s); a restart during an outage loses its backlog",
                          candidate, type(exc).__name__)
                return
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self.path, self._file = candidate, handle
            return
        log.error("audit spool: every spool file next to %s is locked by another process; not spooling", path)

    def load(self) -> tuple[list[IssuedCard], list[FeedbackEntry]]:
        cards: list[IssuedCard] = []
        held: list[FeedbackEntry] = []
        if self._file is None:
            return cards, held
        self._file.seek(0)
        for line in self._file.read().splitlines():
            try:
                item: dict[str, Any] = orjson.loads(line)
                if "card" in item:
                    raw = item["card"]
                    raw["issued_at"] = datetime.fromisoformat(raw["issued_at"])
                    cards.append(IssuedCard(**raw))
                elif "feedback" in item:
                    raw = item["feedback"]
                    raw["outcome_timestamp"] = datetime.fromisoformat(raw["outcome_timestamp"])
                    held.append(FeedbackEntry(**raw))
            except (ValueError, TypeError, KeyError):  # a line cut short by a crash mid-write
                log.error("audit spool: an unreadable line skipped")
        return cards, held

    def append(self, lines: list[bytes]) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0, os.SEEK_END)
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            log.error("audit spool: write failed (%s)", type(exc).__name__)

    def clear(self) -> None:
        if self._file is None:
            return
        with suppress(OSError):
            self._file.truncate(0)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
