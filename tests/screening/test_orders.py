"""Finding the mesotherapy being decided on (cds/screening/orders.py): draft orders, selections, appointments and
planned orders, read with the knowledge in cards/."""

from __future__ import annotations

import copy
from datetime import date, timedelta
from typing import Any

import pytest

from cds.errors import InvalidRequest
from cds.knowledge.loader import KnowledgeBase
from cds.screening.orders import (
    booked_mesotherapy,
    booking_resources,
    draft_resources,
    find_mesotherapy,
    planned_mesotherapy,
    unresolved_based_on,
)

from conftest import load_fixture

MESO_FACE = {"coding": [{"system": "https://mesotherapy-cds.org/fhir/CodeSystem/orderables",
                         "code": "mesotherapy-face", "display": "Mesotherapy, face"}], "text": "Mesotherapy - face"}
LAB = {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}], "text": "Glucose"}
TODAY = date(2026, 3, 2)


def drafts_bundle(*resources: dict[str, Any], full_urls: bool = False) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": r, **({"fullUrl": f"urn:uuid:{r['id']}"} if full_urls else {})} for r in resources]}


def service_request(rid: str, code: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "id": rid, "status": "draft", "intent": "order", "code": code, **more}


def test_the_example_request_orders_mesotherapy_of_the_face(kb: KnowledgeBase) -> None:
    context = load_fixture("requests/order-select-example.json")["context"]
    drafts = draft_resources(context["draftOrders"])
    [order] = find_mesotherapy(kb, "order-select", drafts, context["selections"])
    assert order.ref == "ServiceRequest/sr-meso-1" and order.kind == "draft"
    assert order.matched.by == "code"
    assert order.sites  # the face, from the orderable or the bodySite


def test_order_select_screens_the_selections_and_order_sign_every_draft(kb: KnowledgeBase) -> None:
    drafts = draft_resources(drafts_bundle(service_request("lab", LAB), service_request("meso", MESO_FACE)))
    assert find_mesotherapy(kb, "order-select", drafts, ["ServiceRequest/lab"]) == []
    assert [o.ref for o in find_mesotherapy(kb, "order-sign", drafts, None)] == ["ServiceRequest/meso"]


def test_a_selection_may_name_a_draft_by_its_full_url_or_an_absolute_reference(kb: KnowledgeBase) -> None:
    drafts = draft_resources(drafts_bundle(service_request("meso", MESO_FACE), full_urls=True))
    for ref in ("urn:uuid:meso", "https://ehr.example/fhir/ServiceRequest/meso/_history/3"):
        assert [o.ref for o in find_mesotherapy(kb, "order-select", drafts, [ref])] == ["ServiceRequest/meso"]


def test_a_selection_that_is_not_a_draft_is_a_400_naming_it(kb: KnowledgeBase) -> None:
    drafts = draft_resources(drafts_bundle(service_request("meso", MESO_FACE)))
    with pytest.raises(InvalidRequest) as raised:
        find_mesotherapy(kb, "order-select", drafts, ["ServiceRequest/meso", "ServiceRequest/elsewhere"])
    assert raised.value.expression == "context.selections[1]"


@pytest.mark.parametrize(("bundle", "expression"), [
    ([], "context.draftOrders"), ({"resourceType": "Patient"}, "context.draftOrders"),
    ({"resourceType": "Bundle", "entry": 5}, "context.draftOrders.entry"),
    ({"resourceType": "Bundle", "entry": [{"resource": "x"}]}, "context.draftOrders.entry[0]"),
])
def test_draft_orders_that_are_not_a_bundle_of_resources(bundle: Any, expression: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        draft_resources(bundle)
    assert raised.value.expression == expression


def test_mesotherapy_is_found_by_text_alone(kb: KnowledgeBase) -> None:
    drafts = draft_resources(drafts_bundle(service_request("meso", {"text": "Mésothérapie du visage"})))
    [order] = find_mesotherapy(kb, "order-sign", drafts, None)
    assert order.matched.by == "text"


def appointment(aid: str, status: str = "booked", start: date | None = TODAY + timedelta(days=3),
                **more: Any) -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": aid, "status": status,
            **({"start": f"{start.isoformat()}T09:00:00Z"} if start else {}), **more}


def test_an_appointment_is_mesotherapy_through_its_service_type_or_its_order(kb: KnowledgeBase) -> None:
    planned = service_request("sr-1", MESO_FACE, status="active")
    booking = booking_resources(drafts_bundle(appointment("by-order", basedOn=[{"reference": "ServiceRequest/sr-1"}]),
                                              appointment("by-type", serviceType=[MESO_FACE]),
                                              appointment("other", serviceType=[LAB])))
    assert unresolved_based_on(booking)  # sr-1 is not in the booking: the planned orders are read
    assert [o.ref for o in booked_mesotherapy(kb, booking, [])] == ["Appointment/by-type"]
    found = {o.ref: o for o in booked_mesotherapy(kb, booking, [planned])}
    assert set(found) == {"Appointment/by-order", "Appointment/by-type"}
    assert found["Appointment/by-order"].based_on == "ServiceRequest/sr-1"


def test_patient_view_reads_what_is_planned_within_the_lookahead(kb: KnowledgeBase) -> None:
    in_5_days = (TODAY + timedelta(days=5)).isoformat()
    soon = service_request("soon", MESO_FACE, status="active", occurrenceDateTime=in_5_days)
    later = copy.deepcopy(soon) | {"id": "later", "occurrenceDateTime": (TODAY + timedelta(days=400)).isoformat()}
    past = copy.deepcopy(soon) | {"id": "past", "occurrenceDateTime": (TODAY - timedelta(days=1)).isoformat()}
    done = copy.deepcopy(soon) | {"id": "done", "status": "completed"}
    lab = service_request("lab", LAB, status="active")
    booked = appointment("appt", basedOn=[{"reference": "ServiceRequest/soon"}])
    cancelled = appointment("cancelled", status="cancelled", serviceType=[MESO_FACE])
    orders = planned_mesotherapy(kb, [soon, later, past, done, lab], [booked, cancelled], TODAY, 60)
    # the order booked through its appointment is named once, by the appointment
    assert [(o.ref, o.kind) for o in orders] == [("Appointment/appt", "appointment")]
    orders = planned_mesotherapy(kb, [soon, later, past, done, lab], [], TODAY, 60)
    assert [(o.ref, o.kind, o.when) for o in orders] == [("ServiceRequest/soon", "order", TODAY + timedelta(days=5))]
