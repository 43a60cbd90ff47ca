"""Audit retention: cards issued more than CDS_AUDIT_RETENTION_DAYS ago (7 years by default) are deleted with
their feedback by a background task, in small batches, while hook calls go on being answered promptly."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from cds.store import FeedbackEntry, IssuedCard, Store

from conftest import Service, load_fixture

SERVICE = "/cds-services/mesotherapy-contraindications"
OLD = 20_000
HOOK_BOUND_S = 1.0  # slowest hook call while the pruning runs (typically ~20 ms)


def seed(db: Path) -> None:
    now = datetime.now(UTC)
    old_at, recent_at = now - timedelta(days=8 * 365), now - timedelta(days=6 * 365)

    def card(uuid: str, at: datetime) -> IssuedCard:
        return IssuedCard(uuid, "pregnancy", 1, "critical", "order-sign", f"hi-{uuid}", "ps", at, [])

    async def main() -> None:
        async with await Store.open(f"sqlite+aiosqlite:///{db}") as store:
            await store.record_cards([card(f"old-{i:05d}", old_at) for i in range(OLD)])
            await store.record_cards([card(f"recent-{i}", recent_at) for i in range(10)])
            await store.record_feedback([
                FeedbackEntry("old-00001", "overridden", old_at), FeedbackEntry("recent-1", "overridden", recent_at)])

    asyncio.run(main())


def counts(db: Path) -> tuple[int, int, list[str]]:
    with sqlite3.connect(db) as conn:
        old = conn.execute("SELECT count(*) FROM issued_cards WHERE uuid LIKE 'old-%'").fetchone()[0]
        recent = conn.execute("SELECT count(*) FROM issued_cards WHERE uuid LIKE 'recent-%'").fetchone()[0]
        fb = [r[0] for r in conn.execute("SELECT card_uuid FROM feedback")]
    return old, recent, fb


def test_cards_past_retention_are_pruned_without_holding_up_hooks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = data / "cds.sqlite3"
    seed(db)
    assert counts(db)[0] == OLD
    svc = Service({"CDS_ENV": "dev", "CDS_AUDIT_PRUNE_INTERVAL_S": "0.5"})
    svc.env["CDS_DATA_DIR"] = str(data)
    with svc, httpx.Client(base_url=svc.base_url, timeout=10) as client:
        slowest = 0.0
        deadline = time.monotonic() + 30
        while counts(db)[0] and time.monotonic() < deadline:
            started = time.monotonic()
            response = client.post(SERVICE, json=load_fixture("requests/order-select-example.json"))
            assert response.status_code == 200
            slowest = max(slowest, time.monotonic() - started)
        old, recent, fb = counts(db)
    assert old == 0
    assert recent == 10
    assert fb == ["recent-1"]
    assert slowest < HOOK_BOUND_S, slowest
