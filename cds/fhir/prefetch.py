"""Prefetch templates (the single source for discovery) and gathering the record from prefetch or FHIR.

CDS Hooks "Prefetch Template": a key present with data is used; `null` or an empty Bundle means "no data";
an absent key or an OperationOutcome means "not obtained", so the service fetches the query itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from .client import (
    FhirClient,
    FhirError,
    Limits,
    TooManyEntries,
    malformed_bundle,
    next_link,
    scan_bundle,
    server_allowed,
)

log = logging.getLogger("cds.prefetch")


class FhirAccess(Protocol):
    """What gathering reads of the service's settings (cds.settings.Settings is one)."""

    @property
    def allowed_fhir_servers(self) -> list[str]: ...
    @property
    def loopback_fhir_allowed(self) -> bool: ...
    @property
    def anonymous_fhir_allowed(self) -> bool: ...
    @property
    def fhir_timeout_s(self) -> float: ...
    @property
    def fhir_max_pages(self) -> int: ...
    @property
    def fhir_max_bytes(self) -> int: ...
    @property
    def fhir_max_entries(self) -> int: ...
    @property
    def deadline_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Template:
    key: str
    query: str
    label: str  # what the clinician is told could not be checked


# Inside the spec's restricted subset: instance read, type search with reference and token parameters.
# Conditions come with every status: history-of rules (MI, cancer) and weaning need inactive records too.
TEMPLATES: tuple[Template, ...] = (
    Template("patient", "Patient/{{context.patientId}}", "Patient demographics"),
    Template("conditions", "Condition?patient={{context.patientId}}", "Conditions (problem list)"),
    Template("allergies", "AllergyIntolerance?patient={{context.patientId}}", "Allergies and intolerances"),
    # The pregnancy status and what else the pregnancy rules read in the same series: hCG tests, estimated
    # delivery dates, gestational ages (cards/valuesets/pregnancy-status-code, pregnancy-test-code,
    # estimated-delivery-date-code, gestational-age-code; a test keeps this list and those value sets equal).
    Template("pregnancyStatus", "Observation?patient={{context.patientId}}&code="
             "http://loinc.org|82810-3,http://loinc.org|2113-9,http://loinc.org|2114-7,http://loinc.org|2115-4,"
             "http://loinc.org|25373-2,http://loinc.org|55870-0,http://loinc.org|56497-1,"
             "http://loinc.org|93769-8,http://loinc.org|99104-2,http://loinc.org|2106-3,http://loinc.org|2110-5,"
             "http://loinc.org|2112-1,http://loinc.org|2118-8,http://loinc.org|80384-1,http://loinc.org|80385-8,"
             "http://loinc.org|20994-0,http://loinc.org|19080-1,http://loinc.org|19180-9,"
             "http://loinc.org|20415-6,http://loinc.org|21198-7,http://loinc.org|25372-4,"
             "http://loinc.org|45194-8,http://loinc.org|83086-9,http://loinc.org|2107-1,http://loinc.org|2111-3,"
             "http://loinc.org|2119-6,http://loinc.org|34670-0,http://loinc.org|55869-2,http://loinc.org|11778-8,"
             "http://loinc.org|11779-6,http://loinc.org|11780-4,http://loinc.org|11884-4,"
             "http://loinc.org|11885-1,http://loinc.org|18185-9,http://loinc.org|49051-6,"
             "http://loinc.org|49052-4",
             "Pregnancy status, pregnancy tests and due dates (Observations)"),
    Template("breastfeedingStatus", "Observation?patient={{context.patientId}}&code=http://loinc.org|63895-7",
             "Breastfeeding status (Observation)"),
    Template("medicationRequests",
             "MedicationRequest?patient={{context.patientId}}&status=active,on-hold",
             "Current medication orders"),
    Template("medicationStatements", "MedicationStatement?patient={{context.patientId}}",
             "Medication statements"),
)

# What is planned for the patient: read first at patient-view (and at appointment-book, for the orders its
# appointments are based on); the record is read only when a planned procedure is mesotherapy.
PLANNED_ORDERS = Template("plannedOrders", "ServiceRequest?patient={{context.patientId}}&status=active,draft",
                          "Planned orders")
APPOINTMENTS = Template("appointments", "Appointment?patient={{context.patientId}}&status=proposed,pending,booked",
                        "Planned appointments")
PLANNED_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "order-select": (), "order-sign": (), "patient-view": (PLANNED_ORDERS, APPOINTMENTS),
    "appointment-book": (PLANNED_ORDERS,),
}
HOOK_TEMPLATES: dict[str, tuple[Template, ...]] = {hook: planned + TEMPLATES
                                                   for hook, planned in PLANNED_TEMPLATES.items()}

LABELS = {t.key: t.label for t in (*TEMPLATES, PLANNED_ORDERS, APPOINTMENTS)}
ABSENT = object()


def render(template: str, context: dict[str, Any]) -> str:
    """Fill `{{context.x}}` tokens, URL-encoding each value (ids are validated too; this is the second guard)."""
    out = template
    for name, value in context.items():
        if isinstance(value, str):
            out = out.replace("{{context." + name + "}}", quote(value, safe=""))
    return out


class Gathered:
    """What `gather` obtained, per template key. A plain class, like the other per-request ones (`record.Fact`)."""

    __slots__ = ("data", "unavailable", "fetched", "errors")

    def __init__(self, data: dict[str, list[dict[str, Any]]], unavailable: dict[str, str], fetched: set[str],
                 errors: list[str]) -> None:
        self.data = data
        self.unavailable = unavailable
        self.fetched = fetched  # keys read from the FHIR server
        self.errors = errors  # FhirError kinds, for the metrics


async def gather(request: dict[str, Any], settings: FhirAccess, http: aiohttp.ClientSession,
                 templates: tuple[Template, ...] = TEMPLATES) -> Gathered:
    """Every template's resources, fetching the ones prefetch did not supply, all under one deadline."""
    context = request["context"]
    prefetch = request.get("prefetch") or {}
    client: FhirClient | str | None = None  # made when the prefetch lacks something: the deadline starts then
    data: dict[str, list[dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}
    jobs: dict[str, Any] = {}
    for t in templates:
        value = prefetch.get(t.key, ABSENT) if isinstance(prefetch, dict) else ABSENT
        if value is None:
            data[t.key] = []
            continue
        resources, failed = _prefetched(value)
        if resources is not None and not failed:
            data[t.key] = resources
            if not isinstance(value, dict) or value.get("resourceType") != "Bundle" or next_link(value) is None:
                continue  # the usual case: prefetched in full, nothing to fetch
            client = client if client is not None else _client(request, settings, http)
            if isinstance(client, str):  # a paginated prefetch: the rest of its pages
                unavailable[t.key] = f"the prefetch was paginated, and {client} for the remaining pages"
            else:
                jobs[t.key] = _complete(client, value)
            continue
        client = client if client is not None else _client(request, settings, http)
        if isinstance(client, str):
            sent = ("the EHR sent no prefetch for it" if value is ABSENT else
                    "the EHR's prefetch for it was an error" if failed else
                    "the EHR's prefetch for it was not a readable FHIR resource")
            unavailable[t.key] = f"{sent}, and {client}"
        else:
            jobs[t.key] = _fetch(client, render(t.query, context))
    errors: list[str] = []
    if jobs:
        results = await _run_all(jobs, settings.deadline_s)
        for key, result in results.items():
            if isinstance(result, TooManyEntries):  # screened as far as the cap, and said so
                unavailable[key] = result.reason
                errors.append(result.kind)
                data[key] = result.resources
            elif isinstance(result, FhirError):
                unavailable[key] = result.reason
                errors.append(result.kind)
                data.pop(key, None)
            else:
                data[key] = result
    return Gathered(data, unavailable, set(jobs) - set(unavailable), errors)


def _prefetched(value: Any) -> tuple[list[dict[str, Any]] | None, bool]:
    """A prefetch value's resources (None when absent or not a readable FHIR resource), and whether it is an
    error: an OperationOutcome, or a Bundle with an error OperationOutcome among its entries."""
    if not isinstance(value, dict):
        return None, False
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return None, True
    if kind == "Bundle":
        resources, failed = scan_bundle(value)
        return (None, failed) if failed or malformed_bundle(value) else (resources, False)
    return (None, False) if malformed_bundle(value) else ([value], False)


def _client(request: dict[str, Any], settings: FhirAccess, http: aiohttp.ClientSession) -> FhirClient | str:
    """A FHIR client for this request, its limits counted from now, or the reason why the service may not fetch
    anything."""
    server = request.get("fhirServer")
    auth = request.get("fhirAuthorization")
    token = auth.get("access_token") if isinstance(auth, dict) else None
    if not isinstance(server, str):
        return "it gave no FHIR server to read it from"
    if not server_allowed(server, settings.allowed_fhir_servers, settings.loopback_fhir_allowed):
        log.warning("fhirServer not on the allow-list; not contacted", extra={"fhir_origin": _origin_text(server)})
        return "its FHIR server is not on this service's allow-list"
    if not token and not settings.anonymous_fhir_allowed:
        return "it gave no access token for its FHIR server"
    limits = Limits(settings.fhir_max_bytes, settings.fhir_max_entries,
                    asyncio.get_running_loop().time() + settings.deadline_s)
    return FhirClient(http, server, token, settings.fhir_timeout_s, settings.fhir_max_pages, limits)


def _origin_text(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def _fetch(client: FhirClient, query: str) -> list[dict[str, Any]]:
    result = await client.get(query)
    if result is None:
        return []
    if not isinstance(result, dict):
        raise FhirError("the FHIR server answered with something that is not a FHIR resource")
    wanted = query.split("/")[0] if "?" not in query else None  # an instance read: Patient/1
    if wanted is not None and result.get("resourceType") not in (wanted, "OperationOutcome"):
        got = result.get("resourceType")
        raise FhirError(f"the FHIR server answered the {wanted} read with "
                        f"{'a ' + got if isinstance(got, str) and got.isalnum() else 'something'} "
                        f"instead of a {wanted}")
    if result.get("resourceType") == "Bundle":
        if malformed_bundle(result):
            raise FhirError("the FHIR server answered with a Bundle whose entries cannot be read")
        return await client.complete(result)
    if result.get("resourceType") == "OperationOutcome":
        raise FhirError("the FHIR server answered with an error (OperationOutcome)")
    return [result]


async def _complete(client: FhirClient, bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return await client.complete(bundle)


async def _run_all(jobs: dict[str, Any], deadline_s: float) -> dict[str, Any]:
    tasks = {key: asyncio.ensure_future(job) for key, job in jobs.items()}
    _, pending = await asyncio.wait(tasks.values(), timeout=deadline_s)
    for task in pending:
        task.cancel()
    results: dict[str, Any] = {}
    for key, task in tasks.items():
        if task in pending:
            results[key] = FhirError(f"not obtained within the {deadline_s:g} s deadline", "timeout")
        elif (exc := task.exception()) is not None:
            results[key] = exc if isinstance(exc, FhirError) else FhirError("the FHIR read failed", "unreachable")
            if not isinstance(exc, FhirError):
                log.error("unexpected FHIR fetch failure: %s", type(exc).__name__)
        else:
            results[key] = task.result()
    return results
