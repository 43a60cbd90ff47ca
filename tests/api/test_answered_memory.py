"""The answered-card memory's reads of the store (cds/api/repeats.py): a hook call never waits for the periodic
reread, only for the first read and for the one after feedback this process stored.

Under load a periodic read awaited by a hook call held every call in flight behind it (70-200 ms once a second on
the benchmark's typical record). The store here is a stand-in whose reads wait on a gate the test opens, so the
test decides when a read is slow; the real store's answers are covered end to end by
tests/integration/test_repeats.py (SQLite and PostgreSQL, two processes, a restart).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cds.api.repeats import AnsweredCards
from cds.knowledge.loader import KnowledgeBase

pytestmark = pytest.mark.anyio


class GatedStore:
    """`answered_since` answers `rows` once `gate` is open, counting the reads."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.rows: list[tuple[str, datetime]] = []
        self.reads = 0

    async def answered_since(self, since: datetime) -> list[tuple[str, datetime]]:
        self.reads += 1
        await self.gate.wait()
        return [(k, at) for k, at in self.rows if at >= since]

    async def record_suppressed(self, rows: Any, at: datetime) -> None:
        pass


def cards(kb: KnowledgeBase) -> tuple[list[dict[str, Any]], list[str]]:
    topic = kb.rules[0].id
    return [{"uuid": "u-1", "source": {"topic": {"code": topic}}}], ["key-1"]


async def test_hooks_do_not_wait_for_the_periodic_reread(kb: KnowledgeBase) -> None:
    store = GatedStore()
    memory = AnsweredCards(kb, timedelta(hours=1), refresh_s=0.02)
    store.gate.set()
    memory.start(store)  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.1)
        assert store.reads >= 2  # read at once, then again every refresh_s
        store.gate.clear()  # the store is slow from now on: the background reread hangs
        await asyncio.sleep(0.1)
        shown, keys = cards(kb)
        kept = await asyncio.wait_for(memory.without_answered(store, "order-sign", shown, keys),  # type: ignore[arg-type]
                                      timeout=0.05)
        assert kept == (shown, keys)  # answered without the store, from what is known
    finally:
        store.gate.set()
        await memory.close()


async def test_after_this_process_feedback_the_next_hook_reads_first(kb: KnowledgeBase) -> None:
    store = GatedStore()
    memory = AnsweredCards(kb, timedelta(hours=1), refresh_s=60)  # no periodic reread inside this test
    store.gate.set()
    memory.start(store)  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.05)
        shown, keys = cards(kb)
        assert await memory.without_answered(store, "order-sign", shown, keys) == (shown, keys)  # type: ignore[arg-type]
        store.rows = [("key-1", datetime.now(UTC))]  # the card is answered, through this process
        store.gate.clear()
        memory.stale()
        call = asyncio.ensure_future(memory.without_answered(store, "order-sign", shown, keys))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert not call.done()  # waits for the read: it must not show a card just answered
        store.gate.set()
        assert await asyncio.wait_for(call, timeout=1) == ([], [])
    finally:
        store.gate.set()
        await memory.close()
