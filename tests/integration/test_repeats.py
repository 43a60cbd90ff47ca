"""Issue 16, no repeated interruption, end to end: feedback between hooks, two service processes sharing one
store, a restart; on SQLite and PostgreSQL.

A card answered with feedback (overridden with a reason, or a suggestion accepted) is not shown again for the same
patient, orders and evidence at a later hook within CDS_ANSWERED_CARD_MEMORY_HOURS; a card shown without feedback
is shown again; a change of evidence, patient or order shows it again.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pg
from conftest import Service, load_fixture
from scenarios import topics

REFRESH_S = 0.2  # another process learns of an answer within this (CDS_ANSWERED_CARD_REFRESH_S)
SELECT = "/cds-services/mesotherapy-order-select"
SIGN = "/cds-services/mesotherapy-order-sign"


class Shared:
    """The environment of service processes sharing one store (a SQLite file, or a PostgreSQL database)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def service(self, **more: str) -> Service:
        return Service({**self.env, **more})


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shared]:
    env = {"CDS_ENV": "dev", "CDS_PSEUDONYM_KEY": "repeat-test-key", "CDS_DATA_DIR": str(tmp_path / "data"),
           "CDS_ANSWERED_CARD_REFRESH_S": str(REFRESH_S)}
    url = None
    if request.param == "postgresql":
        url = pg.server().create_database()
        env["CDS_DATABASE_URL"] = url
    try:
        yield Shared(env)
    finally:
        if url:
            pg.server().drop_database(url)


def hook(hook_name: str, patient: str = "pat-1288992", order: str = "sr-meso-1") -> dict[str, Any]:
    request = copy.deepcopy(load_fixture("requests/order-select-example.json"))
    request["hookInstance"] = str(uuid.uuid4())
    request["hook"] = hook_name
    context = request["context"]
    context["patientId"] = patient
    context["draftOrders"]["entry"][0]["resource"]["id"] = order
    if hook_name == "order-select":
        context["selections"] = [f"ServiceRequest/{order}"]
    else:
        context.pop("selections", None)
    request["prefetch"]["patient"]["id"] = patient
    return request


def call(svc: Service, path: str, request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    response = httpx.post(svc.base_url + path, json=request, timeout=10)
    assert response.status_code == 200, response.text
    topics(response)  # one card per topic
    return {c["source"]["topic"]["code"]: c for c in response.json()["cards"]}


def override(svc: Service, card: dict[str, Any]) -> None:
    entry = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-21T09:00:00Z",
             "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "negative test today"}}
    response = httpx.post(svc.base_url + SELECT + "/feedback", json={"feedback": [entry]}, timeout=10)
    assert response.status_code == 200, response.text
    time.sleep(REFRESH_S * 1.5)  # the other processes reread the answered cards


def accept(svc: Service, card: dict[str, Any], path: str = SIGN) -> None:
    entry = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-21T09:01:00Z",
             "acceptedSuggestions": [{"id": card["suggestions"][-1]["uuid"]}]}
    response = httpx.post(svc.base_url + path + "/feedback", json={"feedback": [entry]}, timeout=10)
    assert response.status_code == 200, response.text
    time.sleep(REFRESH_S * 1.5)


def suppressed_metric(svc: Service) -> dict[str, float]:
    text = httpx.get(svc.base_url + "/metrics", timeout=10).text
    return {s.labels["topic"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "cds_cards_suppressed" for s in f.samples if s.name.endswith("_total") and s.value}


def summary(svc: Service) -> dict[str, dict[str, Any]]:
    return {r["rule"]: r for r in httpx.get(svc.base_url + "/feedback/summary", timeout=10).json()["rules"]}


def suppressed_counts(svc: Service, expected: dict[str, int]) -> dict[str, int]:
    """The summary's suppressed counts, once they reach `expected` (they are written after the answer)."""
    deadline = time.monotonic() + 10
    while True:
        counts = {rule: summary(svc)[rule]["suppressed"] for rule in expected}
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_answered_cards_do_not_repeat_at_later_hooks_across_workers_and_a_restart(shared: Shared) -> None:
    first = shared.service().start()
    second = shared.service().start()  # another worker or replica, on the same store
    try:
        shown = call(first, SELECT, hook("order-select"))
        assert set(shown) == {"pregnancy", "allergy-history"}
        override(first, shown["pregnancy"])  # answered: overridden with a reason

        # order-sign for the same order, patient and evidence, on the other process: the overridden card is not
        # shown again; the allergy card, shown without feedback, is (it may not have been seen)
        again = call(second, SIGN, hook("order-sign"))
        assert set(again) == {"allergy-history"}
        assert suppressed_metric(second) == {"pregnancy": 1.0}
        assert suppressed_counts(first, {"pregnancy": 1}) == {"pregnancy": 1}

        accept(second, again["allergy-history"])  # answered: a suggestion accepted
        assert call(first, SELECT, hook("order-select")) == {}

        # never across patients or orders
        assert set(call(first, SIGN, hook("order-sign", patient="pat-other"))) == {"pregnancy", "allergy-history"}
        assert set(call(second, SIGN, hook("order-sign", order="sr-meso-2"))) == {"pregnancy", "allergy-history"}

        # evidence changed: a recorded date now on the pregnancy, a second allergy: both show again
        changed = hook("order-sign")
        changed["prefetch"]["conditions"]["entry"][0]["resource"]["recordedDate"] = "2026-11-20"
        allergy = copy.deepcopy(changed["prefetch"]["allergies"]["entry"][0])
        allergy["resource"]["id"] = "alg-2"
        changed["prefetch"]["allergies"]["entry"].append(allergy)
        assert set(call(second, SIGN, changed)) == {"pregnancy", "allergy-history"}
    finally:
        first.stop()
        second.stop()

    restarted = shared.service().start()  # the memory is in the store, not in a process
    try:
        assert call(restarted, SIGN, hook("order-sign")) == {}
        expected = {"pregnancy": 3, "allergy-history": 2}
        assert suppressed_counts(restarted, expected) == expected
    finally:
        restarted.stop()


def test_the_memory_lasts_the_configured_time(tmp_path: Path) -> None:
    env = {"CDS_ENV": "dev", "CDS_PSEUDONYM_KEY": "k", "CDS_DATA_DIR": str(tmp_path / "data")}
    with Service({**env, "CDS_ANSWERED_CARD_MEMORY_HOURS": str(2 / 3600)}) as svc:  # two seconds
        override(svc, call(svc, SELECT, hook("order-select"))["pregnancy"])
        assert "pregnancy" not in call(svc, SIGN, hook("order-sign"))
        time.sleep(2.5)
        assert "pregnancy" in call(svc, SIGN, hook("order-sign"))
    with Service({**env, "CDS_ANSWERED_CARD_MEMORY_HOURS": "0"}) as svc:  # 0: every card at every hook
        override(svc, call(svc, SELECT, hook("order-select"))["pregnancy"])
        assert "pregnancy" in call(svc, SIGN, hook("order-sign"))


def test_shown_without_feedback_repeats_at_every_hook(service: Service) -> None:
    request = hook("order-select", patient="pat-no-feedback")
    for _ in range(3):
        assert set(call(service, SELECT, request)) == {"pregnancy", "allergy-history"}
