"""Hostile FHIR answers against the real service: a gzip bomb, a 50 MB Bundle, 100,000 entries, a redirect, a Bundle
where a Patient belongs. The stub FHIR server is real HTTP on loopback (tests/stubserver.py).

Bounds (stated in the README): the service's peak RSS stays under 400 MiB through the gzip bomb (4 GiB inflated);
a hook answer arrives within the deadline plus 1 s; /healthz answers within 1 s while a huge answer is read and
parsed (measured on the 2-core development machine: under 0.3 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from conftest import Service, load_fixture
from scenarios import topics
from stubserver import Answer, StubFhir, gzip_bomb, json_answer
from test_fetch import incomplete_detail

SERVICE = "/cds-services/mesotherapy-contraindications"
DEADLINE_S = 0.8
MARGIN_S = 1.0
RSS_BOUND_KIB = 400 * 1024
HEALTHZ_BOUND_S = 1.0
PATIENT = {"resourceType": "Patient", "id": "pat-fetch", "gender": "female", "birthDate": "1991-04-17"}


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service({"CDS_ENV": "dev", "CDS_DEADLINE_S": str(DEADLINE_S)}) as svc:
        yield svc


def request_for(stub: StubFhir) -> dict[str, Any]:
    request = load_fixture("fhir/order-select-no-prefetch.json")
    request["fhirServer"] = stub.base_url
    return request


def rss_kib(svc: Service, field: str) -> int:
    assert svc.proc is not None
    with open(f"/proc/{svc.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


class HealthProbe:
    """Polls /healthz from a thread while a hook call runs; `.worst` is the slowest answer seen."""

    def __init__(self, svc: Service) -> None:
        self.url = svc.base_url + "/healthz"
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                started = time.monotonic()
                assert c.get(self.url).status_code == 200
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def timed_call(svc: Service, request: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(svc.base_url + SERVICE, json=request, timeout=30)
    return response, time.monotonic() - started


def test_gzip_bomb_stops_at_the_cap_and_memory_stays_bounded(service: Service) -> None:
    routes = {kind: gzip_bomb(4 * 1024**3) for kind in ("Condition", "AllergyIntolerance", "Observation",
                                                        "MedicationRequest", "MedicationStatement")}
    routes["Patient"] = json_answer(PATIENT)
    with StubFhir(routes) as stub, HealthProbe(service) as probe:
        response, elapsed = timed_call(service, request_for(stub))
    assert response.status_code == 200, response.text
    assert elapsed < DEADLINE_S + MARGIN_S, elapsed
    detail = incomplete_detail(response)
    for label in ("Conditions", "Allergies", "Current medication orders"):
        assert label in detail
    assert "larger than 10,000,000 bytes" in detail
    assert rss_kib(service, "VmHWM") < RSS_BOUND_KIB
    assert probe.count > 0 and probe.worst < HEALTHZ_BOUND_S, probe.worst


def test_fifty_megabyte_bundle_is_not_read_past_the_cap(service: Service) -> None:
    entry = {"resource": {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/pat-fetch"},
                          "code": {"text": "x" * 400}}}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [entry] * 120_000}
    body = orjson.dumps(bundle)
    assert len(body) > 50_000_000
    routes = {"Patient": json_answer(PATIENT), "Condition": Answer(body),
              "AllergyIntolerance": Answer(lambda: iter([body]))}  # declared length, and streamed without one
    with StubFhir(routes) as stub, HealthProbe(service) as probe:
        response, elapsed = timed_call(service, request_for(stub))
    assert response.status_code == 200
    assert elapsed < DEADLINE_S + MARGIN_S, elapsed
    detail = incomplete_detail(response)
    assert "Conditions (problem list) - the FHIR server's answer was larger than 10,000,000 bytes" in detail, detail
    assert "Allergies and intolerances - the FHIR server's answer was larger than 10,000,000 bytes" in detail
    assert probe.worst < HEALTHZ_BOUND_S, probe.worst
    assert rss_kib(service, "VmHWM") < RSS_BOUND_KIB


def test_hundred_thousand_entries_are_screened_up_to_the_cap_and_said_so() -> None:
    # A pregnancy among the first entries must still give its card: the record is screened as far as the cap.
    pregnancy = {"resourceType": "Condition", "id": "preg", "subject": {"reference": "Patient/pat-fetch"},
                 "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                "code": "active"}]},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "77386006",
                                      "display": "Pregnancy"}]}}
    entries = [{"resource": pregnancy}] + [{"resource": {"resourceType": "Condition", "id": f"c{i}"}}
                                          for i in range(100_000)]
    body = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})
    assert len(body) < 10_000_000  # under the byte cap: the entry cap is what stops it
    # a longer deadline here, so that a slow CI machine still reaches the entry cap instead of the deadline
    with Service({"CDS_ENV": "dev", "CDS_DEADLINE_S": "5", "CDS_FHIR_TIMEOUT_S": "5"}) as svc:
        with StubFhir({"Patient": json_answer(PATIENT), "Condition": Answer(body)}) as stub, \
                HealthProbe(svc) as probe:
            response, elapsed = timed_call(svc, request_for(stub))
        assert response.status_code == 200
        assert elapsed < 5 + MARGIN_S, elapsed
        assert topics(response)["pregnancy"] == "critical"
        detail = incomplete_detail(response)
        assert ("Conditions (problem list) - record too large to screen completely: the search had more than "
                "10,000 entries, and only the first 10,000 were screened") in detail
        assert probe.worst < HEALTHZ_BOUND_S, probe.worst


def test_hundred_thousand_entries_answer_within_the_deadline(service: Service) -> None:
    entries = [{"resource": {"resourceType": "Condition", "id": f"c{i}"}} for i in range(100_000)]
    body = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})
    with StubFhir({"Patient": json_answer(PATIENT), "Condition": Answer(body)}) as stub, \
            HealthProbe(service) as probe:
        response, elapsed = timed_call(service, request_for(stub))
    assert response.status_code == 200
    assert elapsed < DEADLINE_S + MARGIN_S, elapsed
    assert "Conditions (problem list)" in incomplete_detail(response)  # too large, or past the deadline
    assert probe.worst < HEALTHZ_BOUND_S, probe.worst


def test_redirect_is_named_on_the_card() -> None:
    """Not a timing test: generous timeouts, so a loaded machine cannot turn the redirect into a timeout."""
    routes = {"Patient": json_answer(PATIENT),
              "AllergyIntolerance": Answer(b"<html>moved</html>", 302,
                                           {"Location": "https://login.example.org/", "Content-Type": "text/html"})}
    with StubFhir(routes) as stub, Service({"CDS_ENV": "dev", "CDS_DEADLINE_S": "5", "CDS_FHIR_TIMEOUT_S": "5"}) as svc:
        response, _ = timed_call(svc, request_for(stub))
    assert ("Allergies and intolerances - the FHIR server answered with a redirect (HTTP 302) to another address, "
            "which the service does not follow") in incomplete_detail(response)
    assert "not JSON" not in incomplete_detail(response)


def test_bundle_answered_to_the_patient_read_is_named(service: Service) -> None:
    routes = {"Patient": json_answer({"resourceType": "Bundle", "type": "searchset", "entry": []})}
    with StubFhir(routes) as stub:
        response, _ = timed_call(service, request_for(stub))
    assert response.status_code == 412
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert "answered the Patient read with a Bundle instead of a Patient" in diagnostics
    assert "sent no data" not in diagnostics


def test_patient_prefetch_of_the_wrong_type_is_named(service: Service) -> None:
    request = load_fixture("fhir/order-select-no-prefetch.json")
    request["prefetch"] = {"patient": {"resourceType": "Bundle", "type": "searchset",
                                       "entry": [{"resource": {"resourceType": "Practitioner", "id": "x"}}]}}
    response, _ = timed_call(service, request)
    assert response.status_code == 412
    assert "the EHR sent Practitioner where a Patient belongs" in response.json()["issue"][0]["diagnostics"]
