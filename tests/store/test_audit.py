"""The background audit writer against a real SQLite store: what `flush()` promises under a steady stream of cards,
and how feedback waits for a card another worker is still writing."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from cds.store import AuditWriter, FeedbackEntry, IssuedCard, Store, UnknownCard, issued_cards


def card(uuid: str) -> IssuedCard:
    return IssuedCard(uuid, "pregnancy", 3, "critical", "order-sign", f"hi-{uuid}", "ps-1", datetime.now(UTC), [])


async def stored(store: Store) -> set[str]:
    async with store.engine.connect() as conn:
        return set((await conn.execute(sa.select(issued_cards.c.uuid))).scalars())


@pytest.mark.anyio
async def test_flush_under_a_steady_stream_writes_what_came_before_it_and_returns(tmp_path: Path) -> None:
    async with await Store.open(f"sqlite+aiosqlite:///{tmp_path}/cds.sqlite3") as store:
        writer = AuditWriter(store, interval_s=0.01, batch_size=10)
        writer.start()
        numbers = itertools.count()
        streaming = True

        async def stream() -> None:  # ten cards every half millisecond: more than 10-row writes keep up with
            while streaming:
                writer.submit([card(f"c{next(numbers)}") for _ in range(10)])
                await asyncio.sleep(0.0005)

        task = asyncio.create_task(stream())
        await asyncio.sleep(0.1)
        before = next(numbers)  # c0 .. c{before - 1} were submitted before the flush below
        async with asyncio.timeout(10):  # writing until nothing is pending would never end
            await writer.flush()
        assert {f"c{i}" for i in range(before)} <= await stored(store)
        streaming = False
        await task
        await writer.close()
        last = next(numbers)
        assert await stored(store) == {f"c{i}" for i in range(last) if i != before}


@pytest.mark.anyio
async def test_feedback_waits_for_a_card_another_worker_is_still_writing(tmp_path: Path) -> None:
    """Two workers on one database: feedback reaching worker B names a card worker A issued but has not written
    yet. B stores it as soon as A's write lands (not after a fixed delay, and not refused if A takes longer than
    a fixed delay would have allowed); a card nobody issued is refused once B's wait is over."""
    url = f"sqlite+aiosqlite:///{tmp_path}/cds.sqlite3"

    answered_at = datetime.now(UTC)

    def answer(uuid: str) -> FeedbackEntry:
        return FeedbackEntry(card_uuid=uuid, outcome="accepted", outcome_timestamp=answered_at)

    async with await Store.open(url) as store_a, await Store.open(url) as store_b:
        worker_a = AuditWriter(store_a, interval_s=0.6)  # a slow batch: longer than the old 0.3 s grace
        worker_b = AuditWriter(store_b, card_wait_s=3.0)
        worker_a.start()
        worker_b.start()
        loop = asyncio.get_running_loop()
        try:
            worker_a.submit([card("from-a")])
            start = loop.time()
            assert await worker_b.record_feedback([answer("from-a")]) == 1
            waited = loop.time() - start
            assert "from-a" in await stored(store_b)
            assert 0.5 <= waited < 2.0, waited  # A's write, not B's deadline, ended the wait

            start = loop.time()
            assert await worker_b.record_feedback([answer("from-a")]) == 0  # stored: no wait, deduplicated
            assert loop.time() - start < 0.5

            start = loop.time()
            with pytest.raises(UnknownCard):
                await worker_b.record_feedback([answer("from-a"), answer("never-issued")])
            assert 3.0 <= loop.time() - start < 5.0
        finally:
            await worker_a.close()
            await worker_b.close()
