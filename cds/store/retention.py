"""Audit retention: cards issued longer ago than the retention period are deleted, with the feedback on them."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .engine import Database, StoreError
from .feedback import IN_CHUNK
from .tables import feedback, issued_cards, utc

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("cds.audit")


async def prune(db: Database, before: datetime, *, batch: int = IN_CHUNK, pause_s: float = 0.01) -> int:
    """Delete the cards issued before `before`, with the feedback on them; returns how many cards.

    A batch of `batch` cards per short transaction, with a pause between batches, so the hooks' own writes (and
    on SQLite the single write lock) are never held up for long.
    """
    def delete_batch(conn: sa.Connection) -> int:
        uuids = list(conn.execute(
            sa.select(issued_cards.c.uuid).where(issued_cards.c.issued_at < utc(before))
            .order_by(issued_cards.c.issued_at).limit(batch)).scalars())
        if uuids:
            conn.execute(sa.delete(feedback).where(feedback.c.card_uuid.in_(uuids)))
            conn.execute(sa.delete(issued_cards).where(issued_cards.c.uuid.in_(uuids)))
        return len(uuids)

    total = 0
    while True:
        deleted = await db.run_writing("prune", delete_batch)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(pause_s)


async def prune_forever(store: Store, retention_days: float, interval_s: float) -> None:
    """Every `interval_s`, delete what was issued more than `retention_days` ago (in small batches: see
    `prune`). A failing store is logged and tried again at the next interval."""
    while True:
        try:
            removed = await store.prune(datetime.now(UTC) - timedelta(days=retention_days))
            if removed:
                log.info("audit retention: %d issued cards older than %g days deleted, with their feedback",
                         removed, retention_days)
        except StoreError as exc:
            log.warning("audit retention: pruning failed (%s); trying again later", type(exc).__name__)
        await asyncio.sleep(interval_s)
