"""Deterministic order-select requests for the benchmark: a patient record of N realistic R4 resources.

Every record holds the same clinical signal (an active confirmed pregnancy Condition, a recent pregnancy-status
Observation answered "Pregnant" and an active peanut allergy), so every size produces the same two cards
(`pregnancy`, `allergy-history`) and the same amount of evidence validation. The rest of the record is
background that fires no rule: resolved and active benign Conditions, historical medication orders and
statements, older pregnancy/breastfeeding status Observations answered "no", and resolved allergies. Dates are
relative to today, so the request means the same thing on any day. No randomness: the same N gives the same
bytes on the same day.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ORDERABLES = "https://mesotherapy-cds.org/fhir/CodeSystem/orderables"
PATIENT_ID = "pat-bench-1"
EHR = "https://ehr.example.org/fhir/r4"
SIZES = {"typical": 20, "busy": 200, "synthea": 1000}

BENIGN_CONDITIONS = [  # Synthea-style SNOMED findings that no rule of the service matches
    ("444814009", "Viral sinusitis (disorder)"), ("195662009", "Acute viral pharyngitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"), ("15777000", "Prediabetes"),
    ("162864005", "Body mass index 30+ - obesity (finding)"), ("55822004", "Hyperlipidemia"),
    ("271737000", "Anemia (disorder)"), ("66383009", "Gingivitis (disorder)"),
    ("65363002", "Otitis media"), ("44465007", "Sprain of ankle"), ("160903007", "Full-time employment (finding)"),
    ("73595000", "Stress (finding)"), ("314529007", "Medication review due (situation)"),
    ("40055000", "Chronic sinusitis (disorder)"), ("43878008", "Streptococcal sore throat (disorder)"),
    ("37320007", "Migraine without aura"),
]
BENIGN_MEDICATIONS = [  # RxNorm clinical drugs outside the anticoagulant, insulin and immunosuppressant sets
    ("313782", "Acetaminophen 325 MG Oral Tablet"), ("308182", "Amoxicillin 250 MG Oral Capsule"),
    ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("314231", "Simvastatin 10 MG Oral Tablet"), ("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"),
    ("1014676", "cetirizine hydrochloride 5 MG Oral Tablet"), ("197361", "Amlodipine 5 MG Oral Tablet"),
    ("311700", "Ferrous sulfate 325 MG Oral Tablet"),
]
RESOLVED_ALLERGIES = [
    ("419474003", "Allergy to mould", "environment"), ("232350006", "House dust mite allergy", "environment"),
    ("418689008", "Allergy to grass pollen", "environment"), ("300913006", "Shellfish allergy", "food"),
]
# share of the background per prefetch key (the rest goes to conditions)
MIX = {"medicationRequests": 0.28, "pregnancyStatus": 0.10, "breastfeedingStatus": 0.08,
       "medicationStatements": 0.08, "allergies": 0.03}


def _iso(today: date, days_ago: int) -> str:
    return (today - timedelta(days=days_ago)).isoformat()


def _cc(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        out["text"] = text
    return out


def _status(kind: str, code: str) -> dict[str, Any]:
    system = f"http://terminology.hl7.org/CodeSystem/{kind}"
    return {"coding": [{"system": system, "code": code, "display": code.replace("-", " ").capitalize()}]}


def _meta(today: date, days_ago: int) -> dict[str, Any]:
    return {"versionId": "1", "lastUpdated": f"{_iso(today, days_ago)}T09:30:00Z"}


def condition(i: int, today: date, code: str, display: str, *, active: bool, days_ago: int) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Condition", "id": f"cond-{i}", "meta": _meta(today, days_ago),
        "clinicalStatus": _status("condition-clinical", "active" if active else "resolved"),
        "verificationStatus": _status("condition-ver-status", "confirmed"),
        "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category",
                         "problem-list-item" if active else "encounter-diagnosis",
                         "Problem List Item" if active else "Encounter Diagnosis")],
        "code": _cc(SCT, code, display, display.split(" (")[0]),
        "subject": {"reference": f"Patient/{PATIENT_ID}"}, "encounter": {"reference": f"Encounter/enc-{i}"},
        "onsetDateTime": f"{_iso(today, days_ago)}T10:15:00+00:00", "recordedDate": _iso(today, days_ago),
    }
    if not active:
        res["abatementDateTime"] = f"{_iso(today, max(days_ago - 14, 1))}T10:15:00+00:00"
    return res


def allergy(i: int, today: date, code: str, display: str, category: str, *, active: bool,
            days_ago: int) -> dict[str, Any]:
    return {
        "resourceType": "AllergyIntolerance", "id": f"alg-{i}", "meta": _meta(today, days_ago),
        "clinicalStatus": _status("allergyintolerance-clinical", "active" if active else "resolved"),
        "verificationStatus": _status("allergyintolerance-verification", "confirmed"),
        "type": "allergy", "category": [category], "criticality": "low",
        "code": _cc(SCT, code, display, display), "patient": {"reference": f"Patient/{PATIENT_ID}"},
        "recordedDate": _iso(today, days_ago), "recorder": {"reference": "Practitioner/prac-4471"},
        "reaction": [{"manifestation": [_cc(SCT, "247472004", "Wheal", "Hives")], "severity": "mild"}],
    }


def status_observation(i: int, today: date, loinc: str, name: str, answer: tuple[str, str],
                       days_ago: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": f"obs-{i}", "meta": _meta(today, days_ago), "status": "final",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "social-history",
                         "Social History")],
        "code": _cc(LOINC, loinc, name, name), "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "encounter": {"reference": f"Encounter/enc-{i}"},
        "effectiveDateTime": f"{_iso(today, days_ago)}T11:00:00+00:00",
        "issued": f"{_iso(today, days_ago)}T11:05:00.000+00:00",
        "valueCodeableConcept": _cc(LOINC, answer[0], answer[1], answer[1]),
    }


def medication(i: int, today: date, rtype: str, code: str, display: str, *, active: bool,
               days_ago: int) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": rtype, "id": f"med-{i}", "meta": _meta(today, days_ago),
                           "medicationCodeableConcept": _cc(RXNORM, code, display, display),
                           "subject": {"reference": f"Patient/{PATIENT_ID}"}}
    dosage = {"sequence": 1, "text": "Take 1 tablet by mouth daily",
              "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}, "asNeededBoolean": False,
              "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}
    if rtype == "MedicationRequest":
        res.update(status="active" if active else "stopped", intent="order",
                   encounter={"reference": f"Encounter/enc-{i}"}, authoredOn=f"{_iso(today, days_ago)}T10:30:00Z",
                   requester={"reference": "Practitioner/prac-4471"}, dosageInstruction=[dosage])
    else:
        res.update(status="active" if active else "completed", dateAsserted=_iso(today, days_ago),
                   effectivePeriod={"start": _iso(today, days_ago), "end": _iso(today, max(days_ago - 10, 0))},
                   dosage=[dosage])
    return res


def signal(today: date) -> dict[str, list[dict[str, Any]]]:
    """The resources that make the cards: pregnancy Condition and Observation, an active peanut allergy."""
    preg = condition(0, today, "77386006", "Pregnant", active=True, days_ago=70)
    return {
        "conditions": [preg],
        "pregnancyStatus": [status_observation(0, today, "82810-3", "Pregnancy status", ("LA15173-0", "Pregnant"), 21)],
        "allergies": [allergy(0, today, "91935009", "Allergy to peanut (finding)", "food", active=True, days_ago=730)],
    }


def background(key: str, i: int, today: date) -> dict[str, Any]:
    """The i-th background resource of one prefetch key (old, or benign, so that no rule fires)."""
    days_ago = 300 + (i * 37) % 5000
    if key == "conditions":
        code, display = BENIGN_CONDITIONS[i % len(BENIGN_CONDITIONS)]
        return condition(i, today, code, display, active=i % 4 == 0, days_ago=days_ago)
    if key == "allergies":
        code, display, category = RESOLVED_ALLERGIES[i % len(RESOLVED_ALLERGIES)]
        return allergy(i, today, code, display, category, active=False, days_ago=days_ago)
    if key == "pregnancyStatus":
        return status_observation(i, today, "82810-3", "Pregnancy status", ("LA26683-5", "Not pregnant"), days_ago)
    if key == "breastfeedingStatus":
        return status_observation(i, today, "63895-7", "Breastfeeding status",
                                  ("LA29253-4", "Not currently breastfeeding"), days_ago)
    code, display = BENIGN_MEDICATIONS[i % len(BENIGN_MEDICATIONS)]
    rtype = "MedicationRequest" if key == "medicationRequests" else "MedicationStatement"
    return medication(i, today, rtype, code, display, active=i % 5 == 0, days_ago=days_ago)


def patient(today: date) -> dict[str, Any]:
    birth = today.replace(year=today.year - 32, day=min(today.day, 28))
    return {"resourceType": "Patient", "id": PATIENT_ID, "meta": _meta(today, 400), "active": True,
            "identifier": [{"use": "usual", "system": "https://ehr.example.org/mrn", "value": "MRN7700123"}],
            "name": [{"use": "official", "family": "Moreau", "given": ["Claire"]}], "gender": "female",
            "birthDate": birth.isoformat(), "address": [{"city": "Lyon", "country": "FR"}]}


def record(n: int, today: date | None = None) -> dict[str, list[dict[str, Any]]]:
    """prefetch key -> resources, n resources in all (the Patient included)."""
    today = today or date.today()
    data: dict[str, list[dict[str, Any]]] = {"patient": [patient(today)], "conditions": [], "allergies": [],
                                             "pregnancyStatus": [], "breastfeedingStatus": [],
                                             "medicationRequests": [], "medicationStatements": []}
    for key, items in signal(today).items():
        data[key].extend(items)
    rest = max(n - sum(len(v) for v in data.values()), 0)
    counts = {key: int(rest * share) for key, share in MIX.items()}
    counts["conditions"] = rest - sum(counts.values())
    serial = 1
    for key, count in counts.items():
        for _ in range(count):
            data[key].append(background(key, serial, today))
            serial += 1
    return data


def searchset(key: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "link": [{"relation": "self", "url": f"{EHR}/{key}?patient={PATIENT_ID}"}],
            "entry": [{"fullUrl": f"{EHR}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                      for r in resources]}


def hook_request(data: dict[str, list[dict[str, Any]]] | None, *, fhir_server: str | None = None,
                 token: str | None = None, today: date | None = None) -> dict[str, Any]:
    """An order-select request for a mesotherapy-face draft order; prefetch from `data`, or absent."""
    today = today or date.today()
    order = {"resourceType": "ServiceRequest", "id": "sr-meso-1", "status": "draft", "intent": "order",
             "code": _cc(ORDERABLES, "mesotherapy-face", "Mesotherapy, face", "Mesotherapy, face"),
             "bodySite": [_cc(SCT, "89545001", "Face structure", "Face")],
             "subject": {"reference": f"Patient/{PATIENT_ID}"}, "authoredOn": today.isoformat(),
             "requester": {"reference": "Practitioner/prac-4471"}}
    body: dict[str, Any] = {
        "hook": "order-select", "hookInstance": "0f4c5e1a-8b7d-4c2e-9a31-5d6b7e8f9a01",
        "context": {"userId": "Practitioner/prac-4471", "patientId": PATIENT_ID, "encounterId": "enc-bench-1",
                    "selections": ["ServiceRequest/sr-meso-1"],
                    "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}},
    }
    if data is not None:
        body["prefetch"] = {key: (items[0] if key == "patient" else searchset(key, items))
                            for key, items in data.items()}
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "mesotherapy-cds"}
    return body


def count(data: dict[str, list[dict[str, Any]]]) -> int:
    return sum(len(v) for v in data.values())
