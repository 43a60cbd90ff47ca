"""No audit loss through a store outage: a loopback TCP proxy in front of the real PostgreSQL is cut while cards
are issued, the service is even restarted during the outage, and when the link returns every card issued is in
the store, with the feedback given on them while they were pending."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

import pg
from conftest import Service, load_fixture
from tcpproxy import TcpProxy

SERVICE = "/cds-services/mesotherapy-contraindications"


def backlog(svc: Service, kind: str = "cards") -> float:
    text = httpx.get(svc.base_url + "/metrics").text
    found = re.search(r'^cds_audit_backlog\{kind="' + kind + r'"\} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))


def issue(svc: Service, n: int, rate_per_s: float = 20.0) -> list[str]:
    uuids = []
    with httpx.Client(base_url=svc.base_url, timeout=10) as client:
        for _ in range(n):
            started = time.monotonic()
            response = client.post(SERVICE, json=load_fixture("requests/order-select-example.json"))
            assert response.status_code == 200
            uuids += [c["uuid"] for c in response.json()["cards"]]
            time.sleep(max(0.0, 1 / rate_per_s - (time.monotonic() - started)))
    return uuids


def wait_until_written(svc: Service, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (backlog(svc) or backlog(svc, "feedback")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backlog(svc) == 0 and backlog(svc, "feedback") == 0


def stored(url: str, uuids: list[str]) -> tuple[set[str], list[Any]]:
    async def query() -> tuple[set[str], list[Any]]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            cards = {r["uuid"] for r in await conn.fetch("SELECT uuid FROM issued_cards WHERE uuid = ANY($1)", uuids)}
            fb = list(await conn.fetch("SELECT card_uuid, outcome FROM feedback"))
        finally:
            await conn.close()
        return cards, fb

    return asyncio.run(query())


def test_cards_and_feedback_issued_during_an_outage_are_stored_when_it_ends(tmp_path: Path) -> None:
    server = pg.server()
    url = server.create_database()
    try:
        with TcpProxy(server.host, server.port) as proxy:
            proxied = url.replace(f"@{server.host}:{server.port}/", f"@127.0.0.1:{proxy.port}/")
            env = {"CDS_ENV": "dev", "CDS_DATABASE_URL": proxied, "CDS_DATA_DIR": str(tmp_path / "data")}
            svc = Service(env)
            svc.env["CDS_DATA_DIR"] = str(tmp_path / "data")
            svc.start()
            try:
                before = issue(svc, 5)
                wait_until_written(svc)
                proxy.cut()
                during = issue(svc, 40)  # two seconds at 20 requests a second
                assert backlog(svc) == len(during)
                feedback = {"feedback": [{"card": during[0], "outcome": "overridden",
                                          "outcomeTimestamp": "2026-11-21T09:00:00Z"}]}
                held = httpx.post(svc.base_url + SERVICE + "/feedback", json=feedback)
                assert held.status_code == 200 and held.json() == {"received": 1, "stored": 0, "held": 1}
                assert httpx.get(svc.base_url + "/readyz").status_code == 503
            finally:
                svc.stop()  # a restart in the middle of the outage: the backlog goes to the spool file
            spool = (tmp_path / "data" / "audit-spool.jsonl").read_text()
            assert all(u in spool for u in during)
            svc = Service(env)
            svc.env["CDS_DATA_DIR"] = str(tmp_path / "data")
            svc.start()
            try:
                assert backlog(svc) == len(during) and backlog(svc, "feedback") == 1
                after = issue(svc, 5)
                proxy.restore()
                wait_until_written(svc)
            finally:
                svc.stop()
        everything = before + during + after
        cards, fb = stored(url, everything)
        assert cards == set(everything)  # no card lost
        assert [(r["card_uuid"], r["outcome"]) for r in fb] == [(during[0], "overridden")]
        assert (tmp_path / "data" / "audit-spool.jsonl").read_text() == ""
    finally:
        server.drop_database(url)
