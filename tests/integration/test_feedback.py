"""Issue 5 end to end: cards issued, feedback posted, the service restarted, the summary counting every entry
exactly once; on SQLite and on PostgreSQL, through the real service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pg
from conftest import Service, free_port, load_fixture

SERVICE = "/cds-services/mesotherapy-contraindications"
FEEDBACK = SERVICE + "/feedback"


@pytest.fixture(params=["sqlite", "postgresql"])
def audited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    env = {"CDS_ENV": "dev"}
    url = None
    if request.param == "postgresql":
        url = pg.server().create_database()
        env["CDS_DATABASE_URL"] = url
    svc = Service(env)
    svc.env["CDS_DATA_DIR"] = str(tmp_path / "data")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        if url:
            pg.server().drop_database(url)


def issue_cards(svc: Service, n: int = 1) -> list[dict[str, Any]]:
    cards = []
    for _ in range(n):
        response = httpx.post(svc.base_url + SERVICE, json=load_fixture("requests/order-select-example.json"))
        assert response.status_code == 200
        cards.extend(response.json()["cards"])
    return cards


def by_topic(cards: list[dict[str, Any]], topic: str) -> list[dict[str, Any]]:
    return [c for c in cards if c["source"]["topic"]["code"] == topic]


def accepted(card: dict[str, Any], at: str = "2026-11-21T09:00:00Z") -> dict[str, Any]:
    return {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": at,
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}


def overridden(card: dict[str, Any], reason: str | None, at: str = "2026-11-21T09:00:00Z") -> dict[str, Any]:
    entry: dict[str, Any] = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": at}
    if reason:
        coding = next(r for r in card["overrideReasons"] if r["code"] == reason)
        entry["overrideReason"] = {"reason": coding, "userComment": "checked with the patient"}
    return entry


def post(svc: Service, *entries: dict[str, Any]) -> httpx.Response:
    return httpx.post(svc.base_url + FEEDBACK, json={"feedback": list(entries)}, timeout=10)


def summary(svc: Service) -> dict[str, dict[str, Any]]:
    response = httpx.get(svc.base_url + "/feedback/summary", timeout=10)
    assert response.status_code == 200
    return {r["rule"]: r for r in response.json()["rules"]}


def test_feedback_is_counted_once_and_survives_a_restart(audited: Service) -> None:
    cards = issue_cards(audited, 3)
    pregnancy, allergy = by_topic(cards, "pregnancy"), by_topic(cards, "allergy-history")
    assert len(pregnancy) == 3 and len(allergy) == 3
    batch = [accepted(pregnancy[0]), overridden(pregnancy[1], "negative-pregnancy-test"),
             overridden(pregnancy[2], "negative-pregnancy-test"), overridden(allergy[0], "allergy-tested"),
             overridden(allergy[1], None)]
    first = post(audited, *batch)
    assert first.status_code == 200 and first.json() == {"received": 5, "stored": 5}
    again = post(audited, *batch)  # the same feedback again: stored once
    assert again.status_code == 200 and again.json() == {"received": 5, "stored": 0}
    audited.stop()
    audited.start()
    rules = summary(audited)
    assert rules["pregnancy"] == {"rule": "pregnancy", "version": "2", "issued": 3, "silent": 0,
                                  "accepted": 1, "overridden": 2,
                                  "override_reasons": {"negative-pregnancy-test": 2}, "suppressed": 0}
    assert rules["allergy-history"] == {"rule": "allergy-history", "version": "2", "issued": 3, "silent": 0,
                                        "accepted": 0,
                                        "overridden": 2, "override_reasons": {"allergy-tested": 1}, "suppressed": 0}


def test_a_restart_right_after_answering_loses_no_card(audited: Service) -> None:
    cards = issue_cards(audited, 20)
    audited.stop()  # SIGTERM straight after the answers: the pending audit batch must be written
    audited.start()
    assert post(audited, *[overridden(c, None) for c in cards]).status_code == 200
    rules = summary(audited)
    assert rules["pregnancy"]["issued"] == 20 and rules["allergy-history"]["issued"] == 20
    assert all("override_reasons" in r for r in rules.values())


def test_unknown_and_malformed_feedback_is_refused_and_not_stored(audited: Service) -> None:
    card = by_topic(issue_cards(audited), "pregnancy")[0]
    unknown = post(audited, accepted(card), {**accepted(card), "card": "00000000-0000-4000-8000-000000000000"})
    assert unknown.status_code == 400
    assert unknown.json()["issue"][0]["expression"] == ["feedback[1].card"]
    for entry, field in [
        ({"card": card["uuid"], "outcomeTimestamp": "2026-11-21T09:00:00Z"}, "feedback[0].outcome"),
        ({"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-21T09:00:00Z"},
         "feedback[0].acceptedSuggestions"),
        ({**overridden(card, None), "outcomeTimestamp": "yesterday"}, "feedback[0].outcomeTimestamp"),
        ({"outcome": "overridden", "outcomeTimestamp": "2026-11-21T09:00:00Z"}, "feedback[0].card"),
    ]:
        response = post(audited, entry)
        assert response.status_code == 400
        assert response.json()["issue"][0]["expression"] == [field]
    assert httpx.post(audited.base_url + FEEDBACK, content=b"{", timeout=5).status_code == 400
    assert summary(audited)["pregnancy"]["accepted"] == 0


def test_concurrent_feedback_loses_nothing(audited: Service) -> None:
    cards = by_topic(issue_cards(audited, 4), "pregnancy")
    entries = [overridden(c, "record-outdated", at=f"2026-11-21T09:0{i}:00Z") for c in cards for i in range(5)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda e: post(audited, e).status_code, entries + entries))  # each one twice
    assert statuses == [200] * 40
    rules = summary(audited)
    assert rules["pregnancy"]["overridden"] == 20
    assert rules["pregnancy"]["override_reasons"] == {"record-outdated": 20}


def test_metrics_and_health_answer_as_prometheus_and_kubernetes_expect(audited: Service) -> None:
    card = by_topic(issue_cards(audited), "pregnancy")[0]
    post(audited, overridden(card, "negative-pregnancy-test"))
    assert httpx.get(audited.base_url + "/healthz").status_code == 200
    ready = httpx.get(audited.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "ok"
    response = httpx.get(audited.base_url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("cds_cards_total", (("indicator", "critical"), ("topic", "pregnancy")))] >= 1
    assert samples[("cds_feedback_total", (("outcome", "overridden"),))] >= 1
    assert samples[("cds_request_duration_seconds_count", (("hook", "order-select"),))] >= 1
    assert samples[("cds_prefetch_total", (("outcome", "prefetch"),))] >= 7


def test_store_outage_does_not_stop_cards(tmp_path: Path) -> None:
    with Service({"CDS_ENV": "dev", "CDS_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"}) as svc:
        response = httpx.post(svc.base_url + SERVICE, json=load_fixture("requests/order-select-example.json"))
        assert response.status_code == 200 and response.json()["cards"]
        assert httpx.get(svc.base_url + "/readyz").status_code == 503
        card = response.json()["cards"][0]
        held = post(svc, overridden(card, None))  # its card waits for the store: the feedback waits with it
        assert held.status_code == 200 and held.json()["held"] == 1
        metrics = httpx.get(svc.base_url + "/metrics").text
    assert 'cds_store_errors_total{operation="record_cards"} 0.0' not in metrics
    assert 'cds_audit_backlog{kind="feedback"} 1.0' in metrics
    assert json.dumps(card)  # the card itself was complete
