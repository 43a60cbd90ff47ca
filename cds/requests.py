"""The typed boundary: the CDS Hooks request and the feedback request, validated by pydantic.

Each request is a `TypedDict` validated by a `TypeAdapter`, so what the core reads is still a plain dict.
Unknown fields and `extension` objects are tolerated (the spec allows them: `extra="allow"`); the large FHIR
values (prefetch, draftOrders, appointments) are only checked to be objects and passed on as they came, never
walked or copied (the tolerant readers in the core read them). Validation is strict: no coercion, a number is
not a string, `true` is not an integer.

A failure is an `InvalidRequest` (400) naming the first invalid field in `expression`, taken from the pydantic
error's `loc` (`context.selections`, `feedback[0].card`); the diagnostics say what the field must be, from the
descriptions below (one per field: tests/test_requests.py checks that every declared field has one).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    InstanceOf,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from .errors import InvalidRequest
from .screening.hooks import SERVED_HOOKS
from .store import FeedbackEntry

# On each request validated; the TypedDicts nested in one (context, fhirAuthorization, feedback entries) have no
# config of their own, so pydantic validates them with this one too.
_TOLERANT = ConfigDict(strict=True, extra="allow")

# ---------------------------------------------------------------- field types

NonBlank = Annotated[str, StringConstraints(pattern=r"\S")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
Uuid = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                                                r"[0-9a-fA-F]{12}$")]
FhirId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]  # it goes into FHIR queries
Reference = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")]
FhirObject = InstanceOf[dict[str, Any]]  # a FHIR resource or Bundle: checked to be an object, passed on by reference


def _bare_patient_id(value: Any) -> Any:
    """A reference `Patient/x`, sent where the spec asks for a bare id, is tolerated and stripped."""
    return value.removeprefix("Patient/") if isinstance(value, str) else value


def _http_url(value: Any) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise PydanticCustomError("http_url", "not an http(s) URL")
    return str(value)


def _rfc3339(value: Any) -> datetime:
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "not a string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PydanticCustomError("datetime_parsing", "not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise PydanticCustomError("timezone_aware", "no time zone")
    return parsed


PatientId = Annotated[FhirId, BeforeValidator(_bare_patient_id)]
HttpUrl = Annotated[str, PlainValidator(_http_url)]
Timestamp = Annotated[datetime, PlainValidator(_rfc3339)]
Selections = Annotated[list[NonEmpty], Field(min_length=1)]

# ---------------------------------------------------------------- the hook request (CDS Hooks 2.0)


class FhirAuthorization(TypedDict):
    access_token: NonBlank
    token_type: NotRequired[Annotated[str, StringConstraints(pattern=r"(?i)^bearer$")] | None]
    expires_in: NotRequired[int]
    scope: NotRequired[str]
    subject: NotRequired[str]
    patient: NotRequired[str]


class _Context(TypedDict):
    userId: Reference
    patientId: PatientId
    encounterId: NotRequired[FhirId]


# The order hooks' context (CDS Hooks order-select 1.0, order-sign 1.1): selections is required on order-select;
# order-sign defines none, so one sent there (or at any other hook) is tolerated but must still be well formed.
class OrderSelectContext(_Context):
    selections: Selections
    draftOrders: FhirObject


class OrderSignContext(_Context):
    selections: NotRequired[Selections | None]
    draftOrders: FhirObject


class PatientViewContext(_Context):
    selections: NotRequired[Selections | None]
    draftOrders: NotRequired[FhirObject | None]


class AppointmentBookContext(_Context):
    selections: NotRequired[Selections | None]
    draftOrders: NotRequired[FhirObject | None]
    appointments: FhirObject


class _Request(TypedDict):
    hook: NonBlank
    hookInstance: Uuid
    fhirServer: NotRequired[HttpUrl | None]
    fhirAuthorization: NotRequired[FhirAuthorization | None]
    prefetch: NotRequired[FhirObject | None]  # the templates' keys -> resources (or null): read by the core


@with_config(_TOLERANT)
class OrderSelectRequest(_Request):
    context: OrderSelectContext


@with_config(_TOLERANT)
class OrderSignRequest(_Request):
    context: OrderSignContext


@with_config(_TOLERANT)
class PatientViewRequest(_Request):
    context: PatientViewContext


@with_config(_TOLERANT)
class AppointmentBookRequest(_Request):
    context: AppointmentBookContext


@with_config(_TOLERANT)
class _AnyHook(TypedDict):
    hook: NonBlank


_REQUESTS: dict[str, TypeAdapter[Any]] = {
    "order-select": TypeAdapter(OrderSelectRequest), "order-sign": TypeAdapter(OrderSignRequest),
    "patient-view": TypeAdapter(PatientViewRequest), "appointment-book": TypeAdapter(AppointmentBookRequest)}
assert set(_REQUESTS) == set(SERVED_HOOKS)
_ANY_HOOK: TypeAdapter[Any] = TypeAdapter(_AnyHook)

# what each field must be, for the 400's diagnostics ("[]" stands for any array index)
REQUEST_FIELDS = {
    "hook": "a non-empty string",
    "hookInstance": "a UUID",
    "fhirServer": "an http(s) URL",
    "fhirAuthorization": "an object",
    "fhirAuthorization.access_token": "a non-empty string",
    "fhirAuthorization.token_type": "'Bearer'",
    "fhirAuthorization.expires_in": "an integer",
    "fhirAuthorization.scope": "a string",
    "fhirAuthorization.subject": "a string",
    "fhirAuthorization.patient": "a string",
    "context": "an object",
    "context.userId": "a reference such as Practitioner/123",
    "context.patientId": "a FHIR id ([A-Za-z0-9-.], at most 64 characters)",
    "context.encounterId": "a FHIR id ([A-Za-z0-9-.], at most 64 characters)",
    "context.selections": "a non-empty array of references (strings)",
    "context.draftOrders": "a FHIR Bundle (an object)",
    "context.appointments": "a FHIR Bundle (an object)",
    "prefetch": "an object",
}
_REQUIRED_BY_HOOK = ("context.selections", "context.draftOrders", "context.appointments")

# ---------------------------------------------------------------- the feedback request (CDS Hooks 2.0 feedback)


class Coding(TypedDict):
    code: NonEmpty
    system: NotRequired[Any]  # kept when it is a string


class OverrideReason(TypedDict):
    reason: NotRequired[Coding | None]
    userComment: NotRequired[str | None]


class Suggestion(TypedDict):
    id: NonEmpty


class AcceptedFeedback(TypedDict):
    card: NonEmpty
    outcome: Literal["accepted"]
    acceptedSuggestions: Annotated[list[Suggestion], Field(min_length=1)]
    overrideReason: NotRequired[OverrideReason | None]
    outcomeTimestamp: Timestamp


class OverriddenFeedback(TypedDict):  # acceptedSuggestions, if sent, is not read
    card: NonEmpty
    outcome: Literal["overridden"]
    overrideReason: NotRequired[OverrideReason | None]
    outcomeTimestamp: Timestamp


@with_config(_TOLERANT)
class Feedback(TypedDict):
    feedback: Annotated[list[Annotated[AcceptedFeedback | OverriddenFeedback, Discriminator("outcome")]],
                        Field(min_length=1)]


_FEEDBACK: TypeAdapter[Feedback] = TypeAdapter(Feedback)
FEEDBACK_FIELDS = {
    "feedback": "a non-empty array of feedback entries",
    "feedback[]": "an object",
    "feedback[].card": "the card's uuid (a non-empty string)",
    "feedback[].outcome": "'accepted' or 'overridden'",
    "feedback[].acceptedSuggestions": "an array of {id}, required for an accepted card",
    "feedback[].overrideReason": "an object",
    "feedback[].overrideReason.reason": "a Coding with a code",
    "feedback[].overrideReason.userComment": "a string",
    "feedback[].outcomeTimestamp": "an RFC 3339 date-time with a time zone (2026-11-21T09:00:00Z)",
}
_FEEDBACK_TAGS = frozenset(("accepted", "overridden"))  # the union member a pydantic `loc` names: not a field

# ---------------------------------------------------------------- from a pydantic error to a 400


def _invalid(exc: ValidationError, fields: Mapping[str, str], tags: frozenset[str] = frozenset(),
             root: str = "the request body must be a JSON object", root_expression: str | None = None,
             hook: str | None = None) -> InvalidRequest:
    """The first error, named by the deepest described field of its `loc` (FHIRPath-like: `a.b[0].c`)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = [step for step in error["loc"] if step not in tags]
    kind = error["type"]
    if kind in ("union_tag_not_found", "union_tag_invalid"):  # the discriminating field is missing or unknown
        loc.append(str(error.get("ctx", {}).get("discriminator", "")).strip("'"))
        kind = "missing" if kind == "union_tag_not_found" else kind
    path = pattern = description = ""
    expression, used = None, 0
    for i, step in enumerate(loc):
        if isinstance(step, int):
            path, pattern = f"{path}[{step}]", f"{pattern}[]"
        else:
            path, pattern = f"{path}.{step}" if path else step, f"{pattern}.{step}" if pattern else step
        if pattern in fields:
            expression, description, used = path, fields[pattern], i + 1
    if expression is None:
        return InvalidRequest(root, expression=root_expression)
    if kind == "missing" and used == len(loc):
        also = f" for {hook}" if hook and expression in _REQUIRED_BY_HOOK else ""
        return InvalidRequest(f"required field {expression} is missing{also}", expression=expression)
    return InvalidRequest(f"{expression} must be {description}", expression=expression)


def validate_request(body: Any, served: tuple[str, ...] = SERVED_HOOKS) -> dict[str, Any]:
    """The request, when it is a well-formed call of one of the `served` hooks; else InvalidRequest.

    The result is a new dict (context.patientId stripped of a `Patient/` prefix); prefetch and draftOrders are
    the objects that came in.
    """
    hook = body.get("hook") if isinstance(body, dict) else None
    adapter = _REQUESTS[hook] if hook in served else _ANY_HOOK
    try:
        request: dict[str, Any] = adapter.validate_python(body)
    except ValidationError as exc:
        raise _invalid(exc, REQUEST_FIELDS, hook=hook if adapter is not _ANY_HOOK else None) from None
    if adapter is _ANY_HOOK:
        raise InvalidRequest(f"hook {hook!r} is not served by this service (it serves {', '.join(served)})",
                             expression="hook")
    if request.get("fhirAuthorization") is not None and request.get("fhirServer") is None:
        raise InvalidRequest("fhirAuthorization requires fhirServer", expression="fhirServer")
    return request


def parse_feedback(body: Any) -> list[FeedbackEntry]:
    """`{"feedback": [...]}` -> entries; InvalidRequest naming the first malformed entry's field."""
    try:
        entries = _FEEDBACK.validate_python(body)["feedback"]
    except ValidationError as exc:
        raise _invalid(exc, FEEDBACK_FIELDS, _FEEDBACK_TAGS, root_expression="feedback",
                       root="the body must be an object with a non-empty `feedback` array") from None
    parsed = []
    for entry in entries:
        reason: OverrideReason = entry.get("overrideReason") or {}
        coding: Coding | dict[str, Any] = reason.get("reason") or {}
        system = coding.get("system")
        accepted = [s["id"] for s in entry["acceptedSuggestions"]] if entry["outcome"] == "accepted" else []
        parsed.append(FeedbackEntry(
            card_uuid=entry["card"], outcome=entry["outcome"], outcome_timestamp=entry["outcomeTimestamp"],
            accepted_suggestions=accepted,
            override_reason_code=coding.get("code"), override_reason_system=system if isinstance(system, str) else None,
            user_comment=reason.get("userComment")))
    return parsed
