"""The background audit writer against a real SQLite store: what `flush()` promises under a steady stream of cards."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from cds.store import AuditWriter, IssuedCard, Store, issued_cards


def card(uuid: str) -> IssuedCard:
    return IssuedCard(uuid, "pregnancy", 3, "critical", "order-sign", f"hi-{uuid}", "ps-1", datetime.now(UTC), [])


async def stored(store: Store) -> set[str]:
    async with store._engine.connect() as conn:
        return set((await conn.execute(sa.select(issued_cards.c.uuid))).scalars())


def test_flush_under_a_steady_stream_writes_what_came_before_it_and_returns(tmp_path: Path) -> None:
    async def scenario() -> None:
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

    asyncio.run(scenario())
