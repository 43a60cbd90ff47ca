"""From a patient's FHIR Bundle (Synthea, carebundle, an EHR export) to the hook request an EHR would send.

Used by the `cds` command line and the demo EHR page: the Bundle's resources become the prefetch of every
template in the discovery document (a `searchset` Bundle per key, the Patient as it is), so the service never
needs a FHIR server, and a draft mesotherapy ServiceRequest is added for the chosen treatment area and product.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ..knowledge.loader import KnowledgeBase

SYSTEMS = {"rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm", "snomed": "http://snomed.info/sct"}
STATUS_LOINC = {"82810-3": "pregnancyStatus", "63895-7": "breastfeedingStatus"}
LIST_KEYS = {"Condition": "conditions", "AllergyIntolerance": "allergies", "MedicationRequest": "medicationRequests",
             "MedicationStatement": "medicationStatements"}
PREFETCH_KEYS = ("patient", "conditions", "allergies", "pregnancyStatus", "breastfeedingStatus",
                 "medicationRequests", "medicationStatements")
DRAFT_ID = "mesotherapy-draft-1"


class NotFhir(ValueError):
    """The input is not a FHIR Bundle with a Patient, a hook request or a scenario; the message is one line."""


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotFhir(f"{path}: cannot read the file ({type(exc).__name__})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise NotFhir(f"{path}: not JSON ({exc})") from None


def classify(doc: Any, where: str) -> tuple[str, dict[str, Any]]:
    """("request", hook request) or ("bundle", Bundle with a Patient); NotFhir for anything else."""
    if isinstance(doc, dict) and isinstance(doc.get("request"), dict) and "hook" in doc["request"]:
        return "request", doc["request"]  # a test scenario (fixtures/scenarios)
    if isinstance(doc, dict) and "hook" in doc and "context" in doc:
        return "request", doc
    if not isinstance(doc, dict) or "resourceType" not in doc:
        raise NotFhir(f"{where}: not a FHIR resource or CDS Hooks request (no resourceType, no hook)")
    if doc["resourceType"] != "Bundle":
        raise NotFhir(f"{where}: a FHIR {str(doc['resourceType'])[:40]}, not a Bundle of a patient's record")
    patients = [r for r in resources(doc) if r.get("resourceType") == "Patient"]
    if len(patients) != 1:
        raise NotFhir(f"{where}: the Bundle must hold exactly one Patient (it holds {len(patients)})")
    return "bundle", doc


def resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise NotFhir("Bundle.entry must be an array")
    out = []
    for e in entries:
        r = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(r, dict) or not isinstance(r.get("resourceType"), str):
            raise NotFhir("a Bundle entry has no resource with a resourceType")
        if "id" not in r and isinstance(e.get("fullUrl"), str) and e["fullUrl"].startswith("urn:uuid:"):
            r = {**r, "id": e["fullUrl"].removeprefix("urn:uuid:")}  # carebundle mints no ids
        out.append(r)
    return out


def _searchset(found: list[dict[str, Any]]) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(found)}
    if found:
        bundle["entry"] = [{"resource": r, "search": {"mode": "match"}} for r in found]
    return bundle


def prefetch(bundle: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Patient id and a complete prefetch (every key of the discovery document) from a Bundle."""
    lists: dict[str, list[dict[str, Any]]] = {k: [] for k in PREFETCH_KEYS if k != "patient"}
    patient: dict[str, Any] = {}
    for r in resources(bundle):
        kind = r["resourceType"]
        if kind == "Patient":
            patient = r
        elif kind in LIST_KEYS:
            lists[LIST_KEYS[kind]].append(r)
        elif kind == "Observation":
            codes = {c.get("code") for c in (r.get("code") or {}).get("coding") or [] if isinstance(c, dict)}
            for code, key in STATUS_LOINC.items():
                if code in codes:
                    lists[key].append(r)
    pid = str(patient.get("id") or "unknown")
    return pid, {"patient": patient, **{k: _searchset(v) for k, v in lists.items()}}


PLANNED_STATUS = {"ServiceRequest": ("active", "draft"), "Appointment": ("proposed", "pending", "booked")}


def planned(bundle: dict[str, Any]) -> dict[str, Any]:
    """The prefetch keys of what is planned (patient-view, appointment-book): the Bundle's ServiceRequests and
    Appointments of the statuses the discovery templates search for; an empty searchset when nothing is planned."""
    found: dict[str, list[dict[str, Any]]] = {"ServiceRequest": [], "Appointment": []}
    for r in resources(bundle):
        kind = r["resourceType"]
        if kind in PLANNED_STATUS and r.get("status") in PLANNED_STATUS[kind]:
            found[kind].append(r)
    return {"plannedOrders": _searchset(found["ServiceRequest"]), "appointments": _searchset(found["Appointment"])}


def draft_order(kb: KnowledgeBase, patient_id: str, orderable: str, products: list[str]) -> dict[str, Any]:
    """A draft mesotherapy ServiceRequest for one of cards/orderables.yaml's codes, with products as details."""
    found = next((o for o in kb.orderables.orderables if o.code == orderable), None)
    if found is None:
        codes = ", ".join(o.code for o in kb.orderables.orderables)
        raise NotFhir(f"unknown orderable {orderable!r} (one of: {codes})")
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest", "id": DRAFT_ID, "status": "draft", "intent": "order",
        "code": {"coding": [{"system": kb.orderables.system, "code": found.code, "display": found.display}],
                 "text": found.display},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    details = [product_detail(kb, name) for name in products]
    if details:
        order["orderDetail"] = details
    return order


def product_detail(kb: KnowledgeBase, name: str) -> dict[str, Any]:
    """An order detail (CodeableConcept) naming one ingredient of cards/ingredients.yaml."""
    ing = kb.ingredients.get(name)
    if ing is None:
        raise NotFhir(f"unknown product ingredient {name!r} (one of: {', '.join(kb.ingredients)})")
    detail: dict[str, Any] = {"text": ing.display}
    if ing.codes:
        c = ing.codes[0]
        detail["coding"] = [{"system": SYSTEMS.get(c.system, c.system), "code": c.code, "display": c.display}]
    return detail


def hook_request(kb: KnowledgeBase, bundle: dict[str, Any], *, orderable: str = "mesotherapy-face",
                 products: list[str] | None = None, hook: str = "order-select",
                 user: str = "Practitioner/demo") -> dict[str, Any]:
    """The hook request an EHR sends for this patient while ordering mesotherapy."""
    pid, data = prefetch(bundle)
    order = draft_order(kb, pid, orderable, products or [])
    context: dict[str, Any] = {"userId": user, "patientId": pid,
                               "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                               "entry": [{"resource": order}]}}
    if hook == "order-select":
        context["selections"] = [f"ServiceRequest/{DRAFT_ID}"]
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context, "prefetch": data}


def summary(bundle: dict[str, Any]) -> dict[str, Any]:
    """A short patient summary for the demo page: demographics and current problems, allergies, medications."""
    _, data = prefetch(bundle)
    p = data["patient"]
    names = p.get("name") or [{}]
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], dict) else {}
    given = " ".join(x for x in name.get("given") or [] if isinstance(x, str))
    display = name.get("text") or " ".join(x for x in (given, name.get("family") or "") if x) or p.get("id", "")

    def label(r: dict[str, Any]) -> str:
        code = r.get("code") or r.get("medicationCodeableConcept") or {}
        codings = code.get("coding") or [{}] if isinstance(code, dict) else [{}]
        return str(code.get("text") or codings[0].get("display") or codings[0].get("code") or r["resourceType"])

    def status(r: dict[str, Any]) -> str:
        s = r.get("clinicalStatus") if r.get("resourceType") != "MedicationRequest" else r.get("status")
        if isinstance(s, dict):
            s = (s.get("coding") or [{}])[0].get("code")
        return str(s or "")

    def items(key: str, current: tuple[str, ...]) -> list[str]:
        out = [label(e["resource"]) for e in data[key].get("entry", []) if status(e["resource"]) in current]
        return sorted(set(out))

    return {"id": p.get("id"), "name": display, "gender": p.get("gender"), "birthDate": p.get("birthDate"),
            "conditions": items("conditions", ("active", "recurrence", "relapse", "")),
            "allergies": items("allergies", ("active", "")),
            "medications": items("medicationRequests", ("active", "on-hold"))}
