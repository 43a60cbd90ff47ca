"""Prefetch and FHIR fallback against a real FHIR server (Medplum FhirRouter on Node), through the real service."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest

from conftest import free_port, load_fixture
from fhirserver import FhirServer, RecordingServer
from scenarios import topics

SERVICE = "/cds-services/mesotherapy-contraindications"
TOKEN = "fhir-test-token"
EVERYTHING = {"pregnancy": "critical", "allergy-history": "warning", "bleeding-risk": "warning",
              "cancer-history": "warning"}


@pytest.fixture
def fhir(fhir_server: FhirServer) -> FhirServer:
    fhir_server.reset()
    fhir_server.load(load_fixture("fhir/patient-fetch.json"))
    return fhir_server


def hook_request(fhir: FhirServer | None, token: str | None = TOKEN, **prefetch: Any) -> dict[str, Any]:
    request = load_fixture("fhir/order-select-no-prefetch.json")
    if fhir is not None:
        request["fhirServer"] = fhir.base_url
    if token is not None:
        request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                        "scope": "patient/*.read", "subject": "meso-cds"}
    if prefetch:
        request["prefetch"] = prefetch
    return request


def searchset(*resources: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def incomplete_detail(response: httpx.Response) -> str:
    cards = [c for c in response.json()["cards"] if c["source"]["topic"]["code"] == "screening-incomplete"]
    assert len(cards) == 1, response.text
    return str(cards[0]["detail"])


def test_absent_prefetch_is_fetched_with_the_token(client: httpx.Client, fhir: FhirServer) -> None:
    response = client.post(SERVICE, json=hook_request(fhir))
    assert response.status_code == 200, response.text
    assert topics(response) == EVERYTHING
    seen = fhir.requests()
    assert len(seen) == 7
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in seen)
    assert {r["path"].split("?")[0] for r in seen} == {
        "/Patient/pat-fetch", "/Condition", "/AllergyIntolerance", "/Observation", "/MedicationRequest",
        "/MedicationStatement"}


def test_complete_prefetch_makes_no_fhir_call(client: httpx.Client, fhir: FhirServer) -> None:
    bundle = load_fixture("fhir/patient-fetch.json")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    request = hook_request(fhir, patient=by_type["Patient"][0], conditions=searchset(*by_type["Condition"]),
                           allergies=searchset(*by_type["AllergyIntolerance"]), pregnancyStatus=searchset(),
                           breastfeedingStatus=None, medicationRequests=searchset(*by_type["MedicationRequest"]),
                           medicationStatements=searchset())
    response = client.post(SERVICE, json=request)
    assert topics(response) == EVERYTHING
    assert fhir.requests() == []


def test_null_prefetch_means_no_data_and_is_not_fetched(client: httpx.Client, fhir: FhirServer) -> None:
    response = client.post(SERVICE, json=hook_request(fhir, allergies=None))
    expected = {k: v for k, v in EVERYTHING.items() if k != "allergy-history"}
    assert topics(response) == expected
    assert not any(r["path"].startswith("/AllergyIntolerance") for r in fhir.requests())


def test_operation_outcome_prefetch_is_fetched(client: httpx.Client, fhir: FhirServer) -> None:
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "timeout", "diagnostics": "prefetch timed out"}]}
    response = client.post(SERVICE, json=hook_request(fhir, allergies=outcome))
    assert topics(response) == EVERYTHING
    assert any(r["path"].startswith("/AllergyIntolerance") for r in fhir.requests())


def test_paginated_search_results_are_followed(client: httpx.Client, fhir: FhirServer) -> None:
    fhir.configure(page_size=1)
    response = client.post(SERVICE, json=hook_request(fhir))
    assert topics(response) == EVERYTHING
    condition_pages = [r for r in fhir.requests() if r["path"].startswith("/Condition")]
    assert len(condition_pages) == 4  # four Conditions, one per page


def test_paginated_prefetch_is_completed_from_the_server(client: httpx.Client, fhir: FhirServer) -> None:
    fhir.configure(page_size=1)
    first = httpx.get(f"{fhir.base_url}/AllergyIntolerance?patient=pat-fetch",
                      headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert any(link["relation"] == "next" for link in first.get("link", [])) or first["total"] == 1
    cond_first = httpx.get(f"{fhir.base_url}/Condition?patient=pat-fetch",
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()
    fhir.reset()
    fhir.load(load_fixture("fhir/patient-fetch.json"))
    fhir.configure(page_size=1)
    response = client.post(SERVICE, json=hook_request(fhir, conditions=cond_first))
    assert topics(response) == EVERYTHING
    assert len([r for r in fhir.requests() if r["path"].startswith("/Condition")]) == 3  # pages 2-4


def test_foreign_next_link_is_never_followed(client: httpx.Client, fhir: FhirServer) -> None:
    with RecordingServer() as foreign:
        fhir.configure(page_size=1, next_link_base=foreign.base_url)
        response = client.post(SERVICE, json=hook_request(fhir))
        assert foreign.requests == []
    assert response.status_code == 200
    assert "Conditions" in incomplete_detail(response)


def test_foreign_next_link_in_prefetch_is_never_followed(client: httpx.Client, fhir: FhirServer) -> None:
    with RecordingServer() as foreign:
        conditions = searchset(next_url=f"{foreign.base_url}/Condition?page=2")
        response = client.post(SERVICE, json=hook_request(fhir, conditions=conditions))
        assert foreign.requests == []
    assert "Conditions" in incomplete_detail(response)


def test_fhir_server_down_without_patient_prefetch_is_412(client: httpx.Client) -> None:
    request = hook_request(None)
    request["fhirServer"] = f"http://127.0.0.1:{free_port()}"
    response = client.post(SERVICE, json=request)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_fhir_server_down_reports_what_could_not_be_checked(client: httpx.Client) -> None:
    request = hook_request(None, patient={"resourceType": "Patient", "id": "pat-fetch", "gender": "male"})
    request["fhirServer"] = f"http://127.0.0.1:{free_port()}"
    response = client.post(SERVICE, json=request)
    assert response.status_code == 200
    assert topics(response) == {"screening-incomplete": "warning"}
    detail = incomplete_detail(response)
    for label in ("Allergies", "Conditions", "Current medication orders"):
        assert label in detail


def test_slow_fhir_server_is_cut_off_at_the_deadline(client: httpx.Client, fhir: FhirServer) -> None:
    fhir.configure(delay_ms=3000)
    patient = {"resourceType": "Patient", "id": "pat-fetch", "gender": "female", "birthDate": "1991-04-17"}
    started = time.monotonic()
    response = client.post(SERVICE, json=hook_request(fhir, patient=patient))
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < 2.0
    assert "screening-incomplete" in topics(response)
    assert "Allergies" in incomplete_detail(response)


def test_fhir_error_is_reported_not_read_as_no_data(client: httpx.Client, fhir: FhirServer) -> None:
    fhir.configure(fail={"AllergyIntolerance": 500})
    response = client.post(SERVICE, json=hook_request(fhir))
    found = topics(response)
    assert "allergy-history" not in found
    assert found["screening-incomplete"] == "warning"
    assert "Allergies" in incomplete_detail(response)


def test_rejected_token_is_reported(client: httpx.Client, fhir: FhirServer) -> None:
    patient = {"resourceType": "Patient", "id": "pat-fetch", "gender": "female", "birthDate": "1991-04-17"}
    response = client.post(SERVICE, json=hook_request(fhir, token="wrong-token", patient=patient))
    assert topics(response)["screening-incomplete"] == "warning"
    assert "HTTP 401" in incomplete_detail(response)


def test_each_request_is_evaluated_afresh(client: httpx.Client, fhir: FhirServer) -> None:
    request = hook_request(fhir)
    first = topics(client.post(SERVICE, json=request))
    fhir.configure(fail={"AllergyIntolerance": 500})
    second = topics(client.post(SERVICE, json=copy.deepcopy(request)))
    assert first == EVERYTHING
    assert "screening-incomplete" in second
