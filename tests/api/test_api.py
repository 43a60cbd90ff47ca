"""The HTTP contract: discovery, request validation, error bodies, card shape (CDS Hooks 2.0), in process: the app
as `python -m cds` serves it, called over ASGI (conftest.in_process)."""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class

from conftest import load_fixture
from scenarios import assert_no_empty_values

pytestmark = pytest.mark.anyio

SERVICE = "/cds-services/mesotherapy-contraindications"
RESTRICTED_QUERY = re.compile(r"^[A-Z][A-Za-z]+(/\{\{context\.\w+\}\}|\?[\w\-:.]+=[^&]+(&[\w\-:.]+=[^&]+)*)$")


def scenario_request(name: str) -> dict[str, Any]:
    return load_fixture(f"scenarios/{name}.json")["request"]


def assert_valid_card(card: dict[str, Any], draft_refs: set[str]) -> None:
    assert uuid.UUID(card["uuid"]).version == 7 and str(uuid.UUID(card["uuid"])) == card["uuid"]
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    source = card["source"]
    assert source["label"] and urlsplit(source["url"]).scheme in ("http", "https")
    assert source["topic"]["system"] and source["topic"]["code"] and source["topic"]["display"]
    assert card["selectionBehavior"] == "at-most-one"
    assert card["suggestions"][0]["label"] == "Remove the mesotherapy order"
    for suggestion in card["suggestions"]:
        assert suggestion["label"] and suggestion["uuid"]
        for action in suggestion.get("actions", []):
            assert action["type"] in ("create", "update", "delete") and action["description"]
            if action["type"] == "delete":
                assert action["resourceId"] in draft_refs
            else:
                get_fhir_model_class(action["resource"]["resourceType"]).model_validate(action["resource"])
    assert card["overrideReasons"]
    for reason in card["overrideReasons"]:
        assert reason["system"] and reason["code"] and reason["display"]
    for link in card["links"]:
        assert link["label"] and link["type"] == "absolute" and urlsplit(link["url"]).scheme in ("http", "https")
    assert card["detail"].startswith("**Found:**")


RECORD_KEYS = {"patient", "conditions", "allergies", "pregnancyStatus", "breastfeedingStatus", "medicationRequests",
               "medicationStatements"}


async def test_discovery_lists_one_service_per_hook(api: httpx.AsyncClient) -> None:
    response = await api.get("/cds-services")
    assert response.status_code == 200
    services = response.json()["services"]
    assert [(s["id"], s["hook"]) for s in services] == [
        ("mesotherapy-order-select", "order-select"), ("mesotherapy-order-sign", "order-sign"),
        ("mesotherapy-patient-view", "patient-view"), ("mesotherapy-appointment-book", "appointment-book")]
    planned = {"order-select": set(), "order-sign": set(), "patient-view": {"plannedOrders", "appointments"},
               "appointment-book": {"plannedOrders"}}
    for s in services:
        assert s["title"] and s["description"] and s["usageRequirements"]
        assert set(s["prefetch"]) == RECORD_KEYS | planned[s["hook"]]
        for template in s["prefetch"].values():
            assert RESTRICTED_QUERY.match(template), template
            assert "draftOrders" not in template and "selections" not in template
        assert "82810-3" in s["prefetch"]["pregnancyStatus"] and "63895-7" in s["prefetch"]["breastfeedingStatus"]
    assert_no_empty_values(response.json())


async def test_cards_are_valid_and_ordered_by_urgency(api: httpx.AsyncClient) -> None:
    request = scenario_request("ingredient-allergy-lidocaine-plus-penicillin")
    request["prefetch"]["conditions"]["entry"] = scenario_request(
        "pregnancy-active-condition-snomed")["prefetch"]["conditions"]["entry"]
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200
    body = response.json()
    assert_no_empty_values(body)
    cards = body["cards"]
    assert len(cards) >= 3
    ranks = [{"critical": 0, "warning": 1, "info": 2}[c["indicator"]] for c in cards]
    assert ranks == sorted(ranks)
    entries = request["context"]["draftOrders"]["entry"]
    drafts = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
    for card in cards:
        assert_valid_card(card, drafts)
    assert len({c["uuid"] for c in cards}) == len(cards)


async def test_card_ids_are_time_ordered_so_the_audit_index_grows_at_its_end(api: httpx.AsyncClient) -> None:
    ids = []
    for _ in range(3):
        cards = (await api.post(SERVICE, json=scenario_request("pregnancy-active-condition-snomed"))).json()["cards"]
        ids += [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c["suggestions"]]
        await anyio.sleep(0.002)  # version-7 ids order by millisecond first
    assert {uuid.UUID(i).version for i in ids} == {7}
    per_request = len(ids) // 3
    firsts = [ids[i * per_request] for i in range(3)]
    assert firsts == sorted(firsts) and len(set(ids)) == len(ids)


async def test_card_detail_cites_evidence_and_source(api: httpx.AsyncClient) -> None:
    response = await api.post(SERVICE, json=scenario_request("pregnancy-active-condition-snomed"))
    card = response.json()["cards"][0]
    assert card["summary"] == "Mesotherapy contraindicated: active pregnancy"
    detail = card["detail"]
    assert detail.startswith("**Found:** Pregnancy - active, confirmed, since ")
    last = detail.splitlines()[-1]
    assert "Condition/" in last and "77386006" in last and "(by code: " in last
    label = card["source"]["label"]  # CDS Hooks: the primary source of the guidance, named as a reader looks it up
    assert label.startswith("The hospital's article (Tam Anh General Hospital, Hanoi, Department of Aesthetics")
    assert "the clinic's article \"Can I consider the fractional microneedle mesotherapy during pregnancy?\"" in label
    assert card["source"]["url"] == card["links"][0]["url"]
    page = await api.get(card["links"][0]["url"])
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "version 2" in page.text and "absolute contraindications" in page.text


async def test_no_mesotherapy_order_gives_empty_cards(api: httpx.AsyncClient) -> None:
    response = await api.post(SERVICE, json=scenario_request("order-select-only-lab-selected-no-cards"))
    assert response.status_code == 200
    assert response.json() == {"cards": []}


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda r: r.pop("hook"), "hook"),
    (lambda r: r.pop("hookInstance"), "hookInstance"),
    (lambda r: r.update(hookInstance="not-a-uuid"), "hookInstance"),
    (lambda r: r.pop("context"), "context"),
    (lambda r: r["context"].pop("patientId"), "context.patientId"),
    (lambda r: r["context"].pop("userId"), "context.userId"),
    (lambda r: r["context"].pop("selections"), "context.selections"),
    (lambda r: r["context"].update(selections=[]), "context.selections"),
    (lambda r: r["context"].update(selections=["ServiceRequest/not-there"]), "context.selections[0]"),
    (lambda r: r["context"].pop("draftOrders"), "context.draftOrders"),
    (lambda r: r["context"].update(draftOrders=[1, 2]), "context.draftOrders"),
    (lambda r: r["context"]["draftOrders"].update(entry=5), "context.draftOrders.entry"),
    (lambda r: r.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}), "fhirServer"),
    (lambda r: r.update(fhirServer="ftp://x", fhirAuthorization={"access_token": "t"}), "fhirServer"),
    (lambda r: r.update(hook="patient-view"), "hook"),
    (lambda r: r.update(prefetch=[1]), "prefetch"),
    (lambda r: r["context"].update(patientId="me,victim"), "context.patientId"),
    (lambda r: r["context"].update(patientId="me&patient=victim"), "context.patientId"),
    (lambda r: r["context"].update(patientId="x" * 65), "context.patientId"),
], ids=["no-hook", "no-hookInstance", "bad-hookInstance", "no-context", "no-patientId", "no-userId",
        "no-selections", "empty-selections", "unknown-selection", "no-draftOrders", "draftOrders-not-bundle",
        "draftOrders-entry-not-array", "auth-without-server", "bad-fhirServer", "unserved-hook", "prefetch-not-object",
        "patientId-comma-list", "patientId-extra-parameter", "patientId-too-long"])
async def test_bad_requests_get_400_naming_the_problem(api: httpx.AsyncClient, mutate: Any, expected: str) -> None:
    request = copy.deepcopy(scenario_request("pregnancy-active-condition-snomed"))
    mutate(request)
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [expected]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", b'"text"', b"[" * 5000 + b"]" * 5000],
                         ids=["malformed", "empty", "array", "string", "deeply-nested"])
async def test_malformed_bodies_get_400(api: httpx.AsyncClient, body: bytes) -> None:
    response = await api.post(SERVICE, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_body_over_the_limit_gets_413(api: httpx.AsyncClient) -> None:
    body = b"{" + b" " * 1_100_000 + b"}"
    response = await api.post(SERVICE, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_unknown_service_gets_404(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    response = await api.post("/cds-services/something-else", json=request)
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_wrong_method_on_the_hook_gets_405(api: httpx.AsyncClient) -> None:
    response = await api.get(SERVICE)
    assert response.status_code == 405
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_extensions_and_unknown_fields_are_tolerated(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    request["extension"] = {"org.example.flag": True}
    request["version"] = "3.0"
    request["context"]["extension"] = {"org.example.x": 1}
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200
    assert response.json()["cards"][0]["source"]["topic"]["code"] == "pregnancy"


async def test_dstu2_medication_order_does_not_crash(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    request["hook"] = "order-sign"
    request["context"].pop("selections", None)
    request["context"]["draftOrders"]["entry"].append({"resource": {
        "resourceType": "MedicationOrder", "id": "mo-1", "status": "draft",
        "medicationCodeableConcept": {"text": "Mesotherapy cocktail with lidocaine"},
        "dosageInstruction": [{"text": "intradermal"}]}})
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200
    card = response.json()["cards"][0]
    assert card["source"]["topic"]["code"] == "pregnancy"
    deletes = {a["resourceId"] for a in card["suggestions"][0]["actions"]}
    assert "MedicationOrder/mo-1" in deletes


async def test_garbage_resources_in_prefetch_do_not_crash(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    request["prefetch"]["allergies"] = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "AllergyIntolerance", "id": 5, "code": "peanut", "reaction": "bad"}},
        {"resource": "not an object"}, 7, {"fullUrl": "x"}]}
    request["prefetch"]["conditions"]["entry"].append({"resource": {"resourceType": "Condition", "code": [1, {}],
                                                                    "clinicalStatus": 3, "onsetDateTime": "garbage"}})
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200, response.text
    found = {c["source"]["topic"]["code"] for c in response.json()["cards"]}
    assert "pregnancy" in found


async def test_health_endpoints(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).status_code == 200
    assert (await api.get("/readyz")).status_code == 200


async def test_medication_included_in_the_bundle_is_resolved(api: httpx.AsyncClient) -> None:
    request = scenario_request("type2-diabetes-metformin-no-card")
    request["prefetch"]["medicationRequests"] = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "MedicationRequest", "id": "mr-ins", "status": "active", "intent": "order",
                      "medicationReference": {"reference": "Medication/med-ins"},
                      "subject": {"reference": f"Patient/{request['context']['patientId']}"}},
         "search": {"mode": "match"}},
        {"resource": {"resourceType": "Medication", "id": "med-ins",
                      "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "274783",
                                           "display": "insulin glargine"}]}},
         "search": {"mode": "include"}}]}
    response = await api.post(SERVICE, json=request)
    found = {c["source"]["topic"]["code"]: c["indicator"] for c in response.json()["cards"]}
    assert found.get("insulin-dependent-diabetes") == "critical"


async def test_trailing_slashes_are_answered_not_redirected(api: httpx.AsyncClient) -> None:
    assert (await api.get("/cds-services/")).status_code == 200
    response = await api.post(SERVICE + "/", json=scenario_request("pregnancy-active-condition-snomed"))
    assert response.status_code == 200 and response.json()["cards"]


async def test_evidence_that_fails_fhir_validation_still_counts_and_the_card_says_so(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    condition = request["prefetch"]["conditions"]["entry"][0]["resource"]
    condition["onsetDateTime"] = "sometime in spring"  # not a FHIR dateTime
    condition["colour"] = "blue"  # not a Condition element
    for _ in range(2):  # validated, then known from the memo of validated records
        response = await api.post(SERVICE, json=request)
        card = next(c for c in response.json()["cards"] if c["source"]["topic"]["code"] == "pregnancy")
        assert card["indicator"] == "critical"
        assert "did not pass FHIR validation" in card["detail"]


async def test_evidence_the_fhir_models_trip_over_still_counts_and_the_card_says_so(api: httpx.AsyncClient) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    condition = request["prefetch"]["conditions"]["entry"][0]["resource"]
    condition["contained"] = [{"resourceType": 5, "id": "x"}]  # fhir.resources raises TypeError, not a ValidationError
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200, response.text
    card = next(c for c in response.json()["cards"] if c["source"]["topic"]["code"] == "pregnancy")
    assert card["indicator"] == "critical"
    assert "did not pass FHIR validation" in card["detail"]


@pytest.mark.parametrize(("service_id", "hook"), [
    ("mesotherapy-order-select", "order-sign"), ("mesotherapy-order-sign", "order-select"),
    ("mesotherapy-patient-view", "order-select"), ("mesotherapy-appointment-book", "patient-view"),
    ("mesotherapy-contraindications", "patient-view")])
async def test_a_hook_sent_to_another_hooks_service_is_a_400_naming_the_served_hook(
        api: httpx.AsyncClient, service_id: str, hook: str) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    request["hook"] = hook
    response = await api.post(f"/cds-services/{service_id}", json=request)
    assert response.status_code == 400
    served = {"mesotherapy-contraindications": "order-select, order-sign"}.get(
        service_id, service_id.removeprefix("mesotherapy-"))
    assert response.json()["issue"][0]["diagnostics"] == (
        f"hook {hook!r} is not served by this service (it serves {served})")


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
async def test_the_first_service_id_still_answers_both_order_hooks(api: httpx.AsyncClient, hook: str) -> None:
    request = scenario_request("pregnancy-active-condition-snomed")
    request["hook"] = hook
    request["context"]["patientId"] = f"legacy-{hook}"  # the feedback below must not hide cards of other tests
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200 and response.json()["cards"][0]["source"]["topic"]["code"] == "pregnancy"
    card = response.json()["cards"][0]
    for service_id in (SERVICE, f"/cds-services/mesotherapy-{hook}"):  # feedback is taken at every service id
        entry = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-21T09:00:00Z"}
        assert (await api.post(f"{service_id}/feedback", json={"feedback": [entry]})).status_code == 200
