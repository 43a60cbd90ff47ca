"""Issue 17: the review dashboard. The store's period and weekly queries on SQLite and PostgreSQL, and the HTML
and CSV pages through the real service (protected like /feedback/summary)."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cds.store import FeedbackEntry, IssuedCard, Store

import pg
from conftest import Service, load_fixture
from jwks_server import JwksServer, rsa_jwk

SERVICE = "/cds-services/mesotherapy-contraindications"
MONDAY = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)  # a Monday


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/cds.sqlite3"
        return
    url = pg.server().create_database()
    try:
        yield url
    finally:
        pg.server().drop_database(url)


def issued(uid: str, at: datetime, rule: str = "pregnancy", silent: bool = False) -> IssuedCard:
    return IssuedCard(uid, rule, 1, "critical", "order-select", "hi", "ps", at, [f"{uid}-s"], silent=silent)


def overridden(uid: str, reason: str = "record-outdated") -> FeedbackEntry:
    return FeedbackEntry(uid, "overridden", MONDAY + timedelta(days=60), override_reason_code=reason)


@pytest.mark.anyio
async def test_weekly_counts_and_period(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        await store.record_cards([
            issued("a1", MONDAY), issued("a2", MONDAY + timedelta(days=6, hours=13)),  # Sunday 23:00: same week
            issued("a3", MONDAY + timedelta(days=7)), issued("s1", MONDAY + timedelta(days=7), silent=True),
            issued("b1", MONDAY + timedelta(days=21), rule="bleeding-risk"),
        ])
        await store.record_feedback([overridden("a1"), overridden("a3", "negative-pregnancy-test")])
        weeks = await store.weekly()
        assert weeks == [
            {"week": "2026-10-05", "issued": 2, "silent": 0, "accepted": 0, "overridden": 1},
            {"week": "2026-10-12", "issued": 1, "silent": 1, "accepted": 0, "overridden": 1},
            {"week": "2026-10-26", "issued": 1, "silent": 0, "accepted": 0, "overridden": 0},
        ]
        assert await store.weekly(rule="bleeding-risk") == [
            {"week": "2026-10-26", "issued": 1, "silent": 0, "accepted": 0, "overridden": 0}]
        second_week = await store.summary(MONDAY + timedelta(days=7), MONDAY + timedelta(days=14))
        assert second_week == {"rules": [
            {"rule": "pregnancy", "version": "1", "issued": 1, "silent": 1, "accepted": 0, "overridden": 1,
             "override_reasons": {"negative-pregnancy-test": 1}, "suppressed": 0}]}
        assert (await store.summary(until=MONDAY))["rules"] == []


def cards_for(svc: Service, n: int = 1) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        r = httpx.post(svc.base_url + SERVICE, json=load_fixture("requests/order-select-example.json"), timeout=10)
        assert r.status_code == 200
        out += r.json()["cards"]
    return out


def test_dashboard_html_and_csv_count_what_the_summary_counts(tmp_path: Path) -> None:
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        cards = cards_for(svc, 2)
        allergy = [c for c in cards if c["source"]["topic"]["code"] == "allergy-history"]
        reason = allergy[0]["overrideReasons"][0]
        entry = {"card": allergy[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-01T09:00:00Z",
                 "overrideReason": {"reason": reason}}
        assert httpx.post(svc.base_url + SERVICE + "/feedback", json={"feedback": [entry]}).status_code == 200
        summary = {r["rule"]: r for r in httpx.get(svc.base_url + "/feedback/summary").json()["rules"]}
        page = httpx.get(svc.base_url + "/feedback/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert '<svg' in html and "override rate" in html and "<script" not in html and "http://cdn" not in html
        assert f'data-rule="allergy-history" data-version="{summary["allergy-history"]["version"]}"' in html
        assert f'data-col=overridden>{summary["allergy-history"]["overridden"]}<' in html
        assert reason["display"] in html
        rows = list(csv.DictReader(io.StringIO(httpx.get(svc.base_url + "/feedback/dashboard.csv").text)))
        by_rule = {r["rule"]: r for r in rows}
        assert by_rule["allergy-history"]["overridden"] == "1" and by_rule["allergy-history"]["issued"] == "2"
        assert by_rule["allergy-history"]["override_rate"] == "0.5000"
        assert by_rule["allergy-history"]["override_reasons"] == f"{reason['code']}=1"
        assert by_rule["pregnancy"]["issued"] == "2"
        today = datetime.now(UTC).date()
        empty = httpx.get(svc.base_url + f"/feedback/dashboard.csv?until={today - timedelta(days=30)}")
        assert empty.text.count("\n") == 1  # the header only: every card was issued today
        this_week = httpx.get(svc.base_url + f"/feedback/dashboard?since={today}&until={today}&rule=pregnancy")
        assert this_week.status_code == 200 and 'class="week"' in this_week.text
        for bad in ("since=yesterday", "since=2026-12-02&until=2026-12-01", "rule=no-such-rule"):
            response = httpx.get(svc.base_url + f"/feedback/dashboard?{bad}")
            assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"


def test_dashboard_is_protected_like_the_summary(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = "https://ehr.example.org"
    with JwksServer() as jwks:
        url = jwks.publish("/jwks.json", {"keys": [rsa_jwk(key.public_key(), "k1")]})
        svc = Service.trusting(issuer, url, CDS_DATA_DIR=str(tmp_path))
        with svc:
            for path in ("/feedback/summary", "/feedback/dashboard", "/feedback/dashboard.csv"):
                assert httpx.get(svc.base_url + path).status_code == 401
                now = int(time.time())
                token = jwt.encode({"iss": issuer, "aud": svc.base_url + path, "iat": now, "exp": now + 300,
                                    "jti": uuid.uuid4().hex}, key, algorithm="RS384", headers={"kid": "k1"})
                assert httpx.get(svc.base_url + path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert httpx.get(svc.base_url + "/demo").status_code == 404  # the demo page is off outside dev
