"""The CDS Hooks 2.0 request, checked field by field so that a 400 names exactly what is wrong.

Unknown fields and `extension` objects are tolerated (the spec allows them), so the request stays a dict.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidRequest

SERVED_HOOKS = ("order-select", "order-sign", "patient-view", "appointment-book")
ORDER_HOOKS = ("order-select", "order-sign")
# One service per hook (CDS Hooks identifies a service by its URL, `{baseUrl}/cds-services/{id}`, and clients such
# as the reference sandbox key services by that URL, so one id must mean one hook).
SERVICES: dict[str, str] = {
    "mesotherapy-order-select": "order-select",
    "mesotherapy-order-sign": "order-sign",
    "mesotherapy-patient-view": "patient-view",
    "mesotherapy-appointment-book": "appointment-book",
}
LEGACY_SERVICE = "mesotherapy-contraindications"  # answers both order hooks; not listed in discovery
SERVICE_HOOKS: dict[str, tuple[str, ...]] = {**{sid: (hook,) for sid, hook in SERVICES.items()},
                                             LEGACY_SERVICE: ORDER_HOOKS}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_REFERENCE = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def _require_str(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if value is None:
        raise InvalidRequest(f"required field {where}{name} is missing", expression=f"{where}{name}")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{where}{name} must be a non-empty string", expression=f"{where}{name}")
    return value


def validate_request(body: Any, served: tuple[str, ...] = SERVED_HOOKS) -> dict[str, Any]:
    """Return the request when it is a well-formed call of one of the `served` hooks; else InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    hook = _require_str(body, "hook", "")
    if hook not in served:
        raise InvalidRequest(f"hook {hook!r} is not served by this service (it serves {', '.join(served)})",
                             expression="hook")
    instance = _require_str(body, "hookInstance", "")
    if not _UUID.match(instance):
        raise InvalidRequest("hookInstance must be a UUID", expression="hookInstance")
    server = body.get("fhirServer")
    if server is not None:
        parts = urlsplit(server) if isinstance(server, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidRequest("fhirServer must be an http(s) URL", expression="fhirServer")
    auth = body.get("fhirAuthorization")
    if auth is not None:
        if not isinstance(auth, dict):
            raise InvalidRequest("fhirAuthorization must be an object", expression="fhirAuthorization")
        if server is None:
            raise InvalidRequest("fhirAuthorization requires fhirServer", expression="fhirServer")
        _require_str(auth, "access_token", "fhirAuthorization.")
        token_type = auth.get("token_type")
        if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
            raise InvalidRequest("fhirAuthorization.token_type must be 'Bearer'",
                                 expression="fhirAuthorization.token_type")
        for name in ("scope", "subject", "patient"):
            if name in auth and not isinstance(auth[name], str):
                raise InvalidRequest(f"fhirAuthorization.{name} must be a string",
                                     expression=f"fhirAuthorization.{name}")
        if "expires_in" in auth and not (isinstance(auth["expires_in"], int)
                                         and not isinstance(auth["expires_in"], bool)):
            raise InvalidRequest("fhirAuthorization.expires_in must be an integer",
                                 expression="fhirAuthorization.expires_in")
    context = body.get("context")
    if context is None:
        raise InvalidRequest("required field context is missing", expression="context")
    if not isinstance(context, dict):
        raise InvalidRequest("context must be an object", expression="context")
    user = _require_str(context, "userId", "context.")
    if not _REFERENCE.match(user):
        raise InvalidRequest("context.userId must be a reference such as Practitioner/123",
                             expression="context.userId")
    patient = _require_str(context, "patientId", "context.")
    if patient.startswith("Patient/"):  # tolerate a reference where the spec asks for a bare id
        context["patientId"] = patient = patient.removeprefix("Patient/")
    if not _FHIR_ID.match(patient):  # it goes into FHIR queries: nothing but a FHIR id may pass
        raise InvalidRequest("context.patientId must be a FHIR id ([A-Za-z0-9-.], at most 64 characters)",
                             expression="context.patientId")
    if "encounterId" in context and not (isinstance(context["encounterId"], str)
                                         and _FHIR_ID.match(context["encounterId"])):
        raise InvalidRequest("context.encounterId must be a FHIR id", expression="context.encounterId")
    # The order hooks' context (CDS Hooks order-select 1.0, order-sign 1.1): selections is required on
    # order-select; order-sign defines none, so one sent there is tolerated but must still be well formed.
    selections = context.get("selections")
    if selections is None and hook == "order-select":
        raise InvalidRequest("required field context.selections is missing for order-select",
                             expression="context.selections")
    if selections is not None and (not isinstance(selections, list) or not selections or not all(
            isinstance(s, str) and s for s in selections)):
        raise InvalidRequest("context.selections must be a non-empty array of references (strings)",
                             expression="context.selections")
    draft_orders = context.get("draftOrders")
    if hook in ORDER_HOOKS and draft_orders is None:
        raise InvalidRequest("required field context.draftOrders is missing", expression="context.draftOrders")
    if draft_orders is not None and not isinstance(draft_orders, dict):
        raise InvalidRequest("context.draftOrders must be a FHIR Bundle (an object)", expression="context.draftOrders")
    if hook == "appointment-book" and context.get("appointments") is None:
        raise InvalidRequest("required field context.appointments is missing for appointment-book",
                             expression="context.appointments")
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        raise InvalidRequest("prefetch must be an object", expression="prefetch")
    return body
