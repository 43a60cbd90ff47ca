"""Memory bounded by bytes: a long text in a record is matched on its first part only and never memoised, so a
stream of distinct 400 KB texts neither grows the service nor costs it much time (it used to keep +0.8 MB and
spend 0.8 s of event-loop CPU per call)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_hostile_fhir import rss_kib

from conftest import Service, load_fixture
from scenarios import topics

SERVICE = "/cds-services/mesotherapy-contraindications"
CALLS = 20
GROWTH_BOUND_KIB = 6 * 1024  # before the fix: about 16 MiB for these 20 calls
CALL_BOUND_S = 0.5  # per call with one 400 KB text (before: about 0.8 s each)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service({"CDS_ENV": "dev"}) as svc:
        yield svc


def with_long_text(i: int, head: str = "Note") -> dict[str, Any]:
    request = load_fixture("requests/order-select-example.json")
    text = f"{head} {i}: " + " ".join(f"word{i}x{j}" for j in range(40_000))  # about 400 KB, distinct per call
    condition = {"resourceType": "Condition", "id": f"long-{i}", "subject": {"reference": "Patient/example"},
                 "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                "code": "active"}]},
                 "code": {"text": text}}
    request["prefetch"]["conditions"] = {"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": condition}]}
    request["prefetch"]["pregnancyStatus"] = None  # the example's own pregnancy evidence, left out
    return request


def test_distinct_long_texts_do_not_grow_memory_or_stall(service: Service) -> None:
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        for i in range(3):  # warm-up: first-call allocations are not growth
            assert client.post(SERVICE, json=with_long_text(-i - 1)).status_code == 200
        before = rss_kib(service, "VmRSS")
        slowest = 0.0
        for i in range(CALLS):
            request = with_long_text(i)
            started = time.monotonic()
            response = client.post(SERVICE, json=request)
            slowest = max(slowest, time.monotonic() - started)
            assert response.status_code == 200
        growth = rss_kib(service, "VmRSS") - before
    assert growth < GROWTH_BOUND_KIB, growth
    assert slowest < CALL_BOUND_S, slowest


def test_a_long_text_is_still_matched_on_its_first_part(service: Service) -> None:
    without = httpx.post(service.base_url + SERVICE, json=with_long_text(98), timeout=30)
    assert "pregnancy" not in topics(without)
    response = httpx.post(service.base_url + SERVICE, json=with_long_text(99, head="Pregnancy"), timeout=30)
    assert response.status_code == 200
    assert topics(response)["pregnancy"] == "critical"
