"""The typed boundary in process (cds/requests.py): what pydantic accepts, tolerates and names in a 400.

The same rules are exercised over HTTP by test_api, test_validation and test_feedback; these tests pin what is new:
the expression comes from the pydantic error's `loc` (nested feedback fields, array indices), every described
field is where the models say, validation is strict, and the FHIR values pass through uncopied.
"""

from __future__ import annotations

import copy
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import typing_extensions

from cds import requests
from cds.errors import InvalidRequest
from cds.requests import FEEDBACK_FIELDS, REQUEST_FIELDS, parse_feedback, validate_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import workloads  # noqa: E402 - bench/ is not a package

INSTANCE = "0f4c5e1a-8b7d-4c2e-9a31-5d6b7e8f9a01"


def hook_request(hook: str = "order-select") -> dict[str, Any]:
    """The benchmark's typical request (20 resources prefetched), with every optional field of the spec set."""
    body = workloads.hook_request(workloads.record(workloads.SIZES["typical"]), fhir_server=workloads.EHR, token="t")
    body["fhirAuthorization"]["patient"] = workloads.PATIENT_ID
    body["hook"] = hook
    if hook == "appointment-book":
        body["context"]["appointments"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    return body


def feedback_entry(**changes: Any) -> dict[str, Any]:
    entry = {"card": INSTANCE, "outcome": "accepted", "acceptedSuggestions": [{"id": "s-1"}],
             "overrideReason": {"reason": {"code": "x", "system": "https://example.org"}, "userComment": "fine"},
             "outcomeTimestamp": "2026-11-21T09:00:00Z"}
    return {**entry, **changes}


def invalid(call: Any, *args: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call(*args)
    assert caught.value.status == 400
    return caught.value


def put(body: Any, path: str, value: Any) -> None:
    """Set `a.b[0].c` in body."""
    steps = [int(s) if s.isdigit() else s for s in path.replace("[", ".").replace("]", "").split(".")]
    for step in steps[:-1]:
        body = body[step]
    body[steps[-1]] = value


def test_the_typical_request_passes_as_a_dict_with_its_fhir_values_uncopied() -> None:
    body = hook_request()
    body["extension"] = {"com.example.ehr": {"a": 1}}
    body["context"]["extension"] = {"com.example.ehr": [1]}
    body["fhirAuthorization"]["vendor"] = 7
    request = validate_request(body)
    assert type(request) is dict and request == body
    assert request["prefetch"] is body["prefetch"]  # never walked nor copied
    assert request["context"]["draftOrders"] is body["context"]["draftOrders"]


@pytest.mark.parametrize("field", REQUEST_FIELDS)
def test_every_described_request_field_is_named_by_its_400(field: str) -> None:
    body = hook_request("appointment-book" if field == "context.appointments" else "order-select")
    put(body, field, True)  # wrong for every field: not a string, object, array, nor (strictly) an integer
    error = invalid(validate_request, body)
    assert error.expression == field
    assert error.message == f"{field} must be {REQUEST_FIELDS[field]}"


@pytest.mark.parametrize("field", FEEDBACK_FIELDS)
def test_every_described_feedback_field_is_named_by_its_400(field: str) -> None:
    body = {"feedback": [feedback_entry(), feedback_entry()]}
    put(body, field.replace("[]", "[1]"), True)
    error = invalid(parse_feedback, body)
    assert error.expression == field.replace("[]", "[1]")
    assert error.message.startswith(error.expression)


def _declared(hint: Any, path: str) -> typing.Iterator[str]:
    """The field paths a TypedDict declares, nested TypedDicts and arrays of them included."""
    if typing_extensions.is_typeddict(hint):  # pydantic needs typing_extensions.TypedDict before 3.12
        for name, inner in typing.get_type_hints(hint).items():
            yield f"{path}.{name}" if path else name
            yield from _declared(inner, f"{path}.{name}" if path else name)
    elif typing.get_origin(hint) is list:
        yield from _declared(typing.get_args(hint)[0], f"{path}[]")
    else:
        for arg in typing.get_args(hint):
            yield from _declared(arg, path)


def test_every_declared_field_is_described() -> None:
    """A field added to a model without a description would be named by its parent in a 400."""
    by_parent = {"feedback[].acceptedSuggestions", "feedback[].overrideReason.reason"}  # {id}, Coding: their parent
    declared = {p for model in (requests.OrderSelectRequest, requests.OrderSignRequest, requests.PatientViewRequest,
                                requests.AppointmentBookRequest, requests.Feedback) for p in _declared(model, "")}
    described = {p for p in declared if not any(p.startswith((f"{parent}.", f"{parent}[")) for parent in by_parent)}
    assert described == set(REQUEST_FIELDS) | set(FEEDBACK_FIELDS) - {"feedback[]"}


def test_the_expression_of_a_nested_feedback_field_comes_from_the_loc() -> None:
    cases = [
        ([feedback_entry(), feedback_entry(overrideReason={"reason": {"system": "s"}})],
         "feedback[1].overrideReason.reason"),
        ([feedback_entry(acceptedSuggestions=[{"id": "a"}, {"id": ""}])], "feedback[0].acceptedSuggestions"),
        ([feedback_entry(), feedback_entry(), "x"], "feedback[2]"),
        ([feedback_entry(outcome="rejected")], "feedback[0].outcome"),
        ([feedback_entry(outcomeTimestamp="2026-11-21T09:00:00")], "feedback[0].outcomeTimestamp"),
    ]
    for entries, expression in cases:
        assert invalid(parse_feedback, {"feedback": entries}).expression == expression
    missing = invalid(parse_feedback, {"feedback": [{"card": INSTANCE, "outcomeTimestamp": "2026-11-21T09:00:00Z"}]})
    assert (missing.expression, missing.message) == ("feedback[0].outcome",
                                                     "required field feedback[0].outcome is missing")
    for body in (None, [], {"feedback": []}, {"feedback": {}}):
        assert invalid(parse_feedback, body).expression == "feedback"


def test_feedback_reads_what_it_needs_and_tolerates_the_rest() -> None:
    overridden = feedback_entry(outcome="overridden", acceptedSuggestions="not read for an overridden card",
                                overrideReason={"reason": {"code": "c", "system": 5}, "userComment": None}, extra=1)
    accepted, entry = parse_feedback({"feedback": [feedback_entry(), overridden], "extension": {}})
    assert accepted.accepted_suggestions == ["s-1"] and accepted.override_reason_system == "https://example.org"
    assert accepted.outcome_timestamp.utcoffset() is not None and accepted.user_comment == "fine"
    assert (entry.outcome, entry.accepted_suggestions, entry.override_reason_code) == ("overridden", [], "c")
    assert entry.override_reason_system is None and entry.user_comment is None


@pytest.mark.parametrize(("change", "expression"), [
    (lambda r: r["fhirAuthorization"].update(expires_in="300"), "fhirAuthorization.expires_in"),
    (lambda r: r["fhirAuthorization"].update(expires_in=300.0), "fhirAuthorization.expires_in"),
    (lambda r: r["fhirAuthorization"].update(token_type="MAC"), "fhirAuthorization.token_type"),
    (lambda r: r["fhirAuthorization"].update(access_token="  "), "fhirAuthorization.access_token"),
    (lambda r: r["fhirAuthorization"].update(scope=None), "fhirAuthorization.scope"),
    (lambda r: r.update(fhirServer="http://[::1"), "fhirServer"),  # urlsplit raises: a 400, not a 500
    (lambda r: r.update(fhirServer="https:///fhir"), "fhirServer"),
    (lambda r: r.pop("fhirServer"), "fhirServer"),  # fhirAuthorization requires it
    (lambda r: r.update(hook=" "), "hook"),
    (lambda r: r.update(hookInstance=INSTANCE + "\n"), "hookInstance"),
    (lambda r: r["context"].update(patientId="pat-1\n"), "context.patientId"),  # the old `re` check let this pass
    (lambda r: r["context"].update(patientId="Patient/a,b"), "context.patientId"),
    (lambda r: r["context"].update(userId="Practitioner/"), "context.userId"),
    (lambda r: r["context"].update(encounterId=None), "context.encounterId"),
    (lambda r: r["context"].update(selections=["ServiceRequest/1", ""]), "context.selections"),
    (lambda r: r["context"].update(draftOrders=None), "context.draftOrders"),
])
def test_strict_checks(change: Any, expression: str) -> None:
    body = hook_request()
    change(body)
    assert invalid(validate_request, body).expression == expression


@pytest.mark.parametrize("change", [
    lambda r: r["fhirAuthorization"].update(token_type="bearer"),
    lambda r: r["fhirAuthorization"].pop("token_type"),
    lambda r: r.update(fhirServer="HTTP://127.0.0.1:8080/fhir"),
    lambda r: r.update(fhirServer=None, fhirAuthorization=None),
    lambda r: r.update(prefetch=None),
    lambda r: r.update(hook="order-sign") or r["context"].pop("selections"),
    lambda r: r.update(hook="order-sign") or r["context"].update(selections=None),
    lambda r: r.update(hook="patient-view") or r["context"].pop("draftOrders"),
], ids=["bearer-lower-case", "no-token-type", "upper-case-scheme", "null-server-and-auth", "null-prefetch",
        "order-sign-without-selections", "order-sign-null-selections", "patient-view-without-draftOrders"])
def test_what_is_tolerated(change: Any) -> None:
    body = hook_request()
    change(body)
    validate_request(body)


def test_a_patient_reference_is_stripped_to_its_id_in_the_result_only() -> None:
    body = hook_request()
    body["context"]["patientId"] = "Patient/pat-1"
    assert validate_request(body)["context"]["patientId"] == "pat-1"
    assert body["context"]["patientId"] == "Patient/pat-1"


def test_hook_specific_requirements_and_served_hooks() -> None:
    body = hook_request()
    del body["context"]["selections"]
    error = invalid(validate_request, body)
    assert error.message == "required field context.selections is missing for order-select"
    booking = hook_request("appointment-book")
    del booking["context"]["appointments"]
    assert invalid(validate_request, booking).expression == "context.appointments"
    unserved = invalid(validate_request, copy.deepcopy(hook_request()), ("patient-view",))
    assert (unserved.expression, unserved.message) == (
        "hook", "hook 'order-select' is not served by this service (it serves patient-view)")
    assert invalid(validate_request, [hook_request()]).expression is None
