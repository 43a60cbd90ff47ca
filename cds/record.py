"""The patient's record as the rules see it: slim facts read once from raw FHIR JSON.

Status filtering that applies to every rule (refuted, entered-in-error, Observation status, medication
status) happens here, once; rules only ask "current" or "ever".
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from .fhirjson import (
    EMPTY,
    Coded,
    choice,
    choice_date,
    coded,
    listed,
    parse_date,
    parse_instant,
    ref_key,
    status_code,
)

EXCLUDED_VERIFICATION = {"refuted", "entered-in-error"}
UNCONFIRMED = {"unconfirmed", "provisional", "differential", "presumed"}
CURRENT_CLINICAL = {"active", "recurrence", "relapse"}
COUNTED_OBSERVATION = {"final", "amended", "corrected"}
COUNTED_REQUEST = {"active", "on-hold"}
COUNTED_STATEMENT = {"active", "on-hold", "recorded"}  # R5 `recorded`, unless adherence says not taking
NOT_TAKING = {"not-taking", "not-taken", "stopped", "on-hold-not-taking"}


class Fact:
    """One resource, reduced to what rules match on, with the raw JSON kept for evidence validation.

    The facts, like the other per-request objects of the compiled modules, are plain classes with an explicit
    `__init__` rather than dataclasses: mypyc compiles an explicit `__init__`, while a dataclass's generated
    one stays interpreted, about ten times the cost of building the object.
    """

    __slots__ = ("resource_type", "id", "code", "raw", "clinical", "verification", "onset", "abated", "abatement",
                 "recorded", "body_site")

    def __init__(self, resource_type: str, id: str, code: Coded, raw: dict[str, Any], clinical: str | None = None,
                 verification: str | None = None, onset: date | None = None, abated: bool = False,
                 abatement: date | None = None, recorded: date | None = None, body_site: Coded = EMPTY) -> None:
        self.resource_type = resource_type
        self.id = id
        self.code = code
        self.raw = raw
        self.clinical = clinical
        self.verification = verification
        self.onset = onset
        self.abated = abated
        self.abatement = abatement
        self.recorded = recorded
        self.body_site = body_site

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def unconfirmed(self) -> bool:
        return self.verification in UNCONFIRMED

    def is_current(self, today: date) -> bool:
        """Active now: clinicalStatus active (or not recorded) and no abatement already passed."""
        if self.clinical is not None and self.clinical not in CURRENT_CLINICAL and self.clinical != "unknown":
            return False
        if self.abated and (self.abatement is None or self.abatement <= today):
            return False
        return True

    @property
    def status_text(self) -> str:
        parts = [self.clinical or "clinical status not recorded"]
        if self.verification:
            parts.append(self.verification)
        return ", ".join(parts)


class AllergyFact(Fact):
    __slots__ = ("substances", "criticality", "manifestations")

    def __init__(self, resource_type: str, id: str, code: Coded, raw: dict[str, Any], clinical: str | None = None,
                 verification: str | None = None, onset: date | None = None, recorded: date | None = None,
                 substances: Coded = EMPTY, criticality: str | None = None, manifestations: Coded = EMPTY) -> None:
        super().__init__(resource_type, id, code, raw, clinical=clinical, verification=verification, onset=onset,
                         recorded=recorded)
        self.substances = substances
        self.criticality = criticality
        self.manifestations = manifestations

    @property
    def agent(self) -> Coded:
        return self.code.merged(self.substances)


class ObservationFact(Fact):
    __slots__ = ("when", "status", "value", "value_boolean")

    def __init__(self, resource_type: str, id: str, code: Coded, raw: dict[str, Any], when: datetime | None = None,
                 status: str | None = None, value: Coded = EMPTY, value_boolean: bool | None = None) -> None:
        super().__init__(resource_type, id, code, raw, onset=when.date() if when else None)
        self.when = when
        self.status = status
        self.value = value
        self.value_boolean = value_boolean


class Patient:
    __slots__ = ("id", "gender", "birth_date")

    def __init__(self, id: str, gender: str | None, birth_date: date | None) -> None:
        self.id = id
        self.gender = gender
        self.birth_date = birth_date

    def age(self, today: date) -> int | None:
        if self.birth_date is None:
            return None
        b = self.birth_date
        return today.year - b.year - ((today.month, today.day) < (b.month, b.day))


class PatientRecord:
    __slots__ = ("patient", "conditions", "allergies", "observations", "medications", "unavailable", "draft_ids")

    def __init__(self, patient: Patient, draft_ids: set[str] | None = None) -> None:
        self.patient = patient
        self.conditions: list[Fact] = []
        self.allergies: list[AllergyFact] = []
        self.observations: list[ObservationFact] = []
        self.medications: list[Fact] = []
        self.unavailable: dict[str, str] = {}  # data label -> why it could not be had
        self.draft_ids = draft_ids if draft_ids is not None else set()


def read_patient(raw: dict[str, Any], fallback_id: str) -> Patient:
    gender = raw.get("gender")
    return Patient(
        id=str(raw.get("id") or fallback_id),
        gender=gender if isinstance(gender, str) else None,
        birth_date=parse_date(raw.get("birthDate")),
    )


def _id(raw: dict[str, Any]) -> str:
    return str(raw.get("id") or "(no id)")


Relevant = Callable[[Coded], bool]  # does any rule care about this concept? (skips reading the rest)
Medications = dict[str, dict[str, Any]]  # `Medication/id` -> Medication resources from the same Bundles
Reader = Callable[[dict[str, Any], Relevant | None, Medications | None], Any]  # every reader's signature


def read_condition(raw: dict[str, Any], relevant: Relevant | None = None,
                   medications: Medications | None = None) -> Fact | None:
    code = coded(raw.get("code"))
    if relevant is not None and not relevant(code):
        return None
    verification = status_code(raw.get("verificationStatus"))
    if verification in EXCLUDED_VERIFICATION:
        return None
    abated, abatement = choice_date(raw, "abatement", end=True)
    if abated and choice(raw, "abatement") == ("Boolean", False):  # STU3 abatementBoolean false
        abated = False
    return Fact(
        str(raw.get("resourceType")), _id(raw), code, raw,
        clinical=status_code(raw.get("clinicalStatus")),
        verification=verification,
        onset=choice_date(raw, "onset")[1],
        abated=abated,
        abatement=abatement,
        recorded=parse_date(raw.get("recordedDate") or raw.get("assertedDate") or raw.get("dateRecorded")),
        body_site=coded(raw.get("bodySite")),
    )


def read_allergy(raw: dict[str, Any], relevant: Relevant | None = None,
                 medications: Medications | None = None) -> AllergyFact | None:
    """Every allergy counts (a rule asks about any allergy), so `relevant` does not filter here."""
    verification = status_code(raw.get("verificationStatus"))
    if verification in EXCLUDED_VERIFICATION:
        return None
    substances = Coded()
    manifestations = Coded()
    for reaction in listed(raw.get("reaction")):
        if isinstance(reaction, dict):
            substances = substances.merged(coded(reaction.get("substance")))
            manifestations = manifestations.merged(coded(reaction.get("manifestation")))
    criticality = raw.get("criticality")
    return AllergyFact(
        str(raw.get("resourceType")), _id(raw), coded(raw.get("code")), raw,
        clinical=status_code(raw.get("clinicalStatus")),
        verification=verification,
        onset=choice_date(raw, "onset")[1],
        recorded=parse_date(raw.get("recordedDate")),
        substances=substances,
        criticality=criticality if isinstance(criticality, str) else None,
        manifestations=manifestations,
    )


def read_observation(raw: dict[str, Any], relevant: Relevant | None = None,
                     medications: Medications | None = None) -> ObservationFact | None:
    status = status_code(raw.get("status"))
    if status not in COUNTED_OBSERVATION:
        return None
    code = coded(raw.get("code"))
    if relevant is not None and not relevant(code):
        return None
    effective = choice(raw, "effective")
    when = None
    if effective is not None:
        kind, value = effective
        if kind == "Period" and isinstance(value, dict):
            value = value.get("end") or value.get("start")
        when = parse_instant(value)
    when = when or parse_instant(raw.get("issued"))
    value_choice = choice(raw, "value")
    value = Coded()
    value_boolean = None
    if value_choice is not None:
        kind, v = value_choice
        if kind == "Boolean" and isinstance(v, bool):
            value_boolean = v
        elif kind in ("CodeableConcept", "String", "Coding"):
            value = coded(v)
    return ObservationFact(str(raw.get("resourceType")), _id(raw), code, raw, when=when, status=status,
                           value=value, value_boolean=value_boolean)


def read_medication(raw: dict[str, Any], relevant: Relevant | None = None,
                    medications: Medications | None = None) -> Fact | None:
    """MedicationRequest / MedicationStatement (and DSTU2 MedicationOrder) the patient is taking now.

    `medications` maps `Medication/id` to Medication resources that came in the same Bundles (`_include`).
    """
    rtype = raw.get("resourceType")
    status = status_code(raw.get("status"))
    if rtype == "MedicationStatement":
        if status not in COUNTED_STATEMENT:
            return None
        adherence = status_code((raw.get("adherence") or {}).get("code")) if isinstance(
            raw.get("adherence"), dict) else None
        if adherence in NOT_TAKING or raw.get("taken") in ("n", "not"):
            return None
    elif status not in COUNTED_REQUEST or raw.get("doNotPerform") is True:
        return None
    code = medication_code(raw, medications)
    if relevant is not None and not relevant(code):
        return None
    return Fact(str(raw.get("resourceType")), _id(raw), code, raw, clinical=status)


def medication_code(raw: dict[str, Any], medications: Medications | None = None) -> Coded:
    """The medication of a request/statement: R4 medication[x], R5 medication.concept, or the referenced
    Medication (contained, or included in the same Bundle) with its ingredients."""
    med = coded(raw.get("medicationCodeableConcept"))
    r5 = raw.get("medication")
    if isinstance(r5, dict):
        med = med.merged(coded(r5))
    for key in ("medicationReference", "medication"):
        ref = raw.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), dict):  # R5 CodeableReference.reference
            ref = ref["reference"]
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            contained = contained_resource(raw, ref)
            if contained is None and medications:
                contained = medications.get(ref_key(str(ref["reference"])))
            if contained is not None:
                med = med.merged(coded(contained.get("code")))
                for ing in listed(contained.get("ingredient")):
                    if isinstance(ing, dict):
                        med = med.merged(coded(ing.get("itemCodeableConcept") or ing.get("item")))
            if isinstance(ref.get("display"), str):
                med = med.merged(Coded((), (ref["display"],)))
    return med


def contained_resource(raw: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any] | None:
    target = ref.get("reference")
    if not isinstance(target, str) or not target.startswith("#"):
        return None
    for item in listed(raw.get("contained")):
        if isinstance(item, dict) and item.get("id") == target[1:]:
            return item
    return None


_VALIDATED: dict[bytes, str | None] = {}  # a resource's JSON -> problem; a record is sent again at every hook call
_VALIDATED_LIMIT = 32 * 1024 * 1024  # bytes of JSON remembered, then the memo starts again
_validated_bytes = 0


def validate_evidence(raw: dict[str, Any]) -> str | None:
    """Validate one evidence resource against R4 (R4B models), then R5; the problem, if neither accepts it.

    Full validation costs ~0.5 ms a resource, so the outcome is remembered, keyed by the resource's own JSON:
    the same record comes back at order-select, again as orders are edited, and at order-sign. The JSON itself
    is the key (no digest, so no collisions), and it is cheaper than hashing it: ~1 us against ~4 us.
    """
    global _validated_bytes
    try:
        key = orjson.dumps(raw)
    except TypeError:
        return "the resource is not plain JSON"
    if key in _VALIDATED:
        return _VALIDATED[key]
    if _validated_bytes + len(key) > _VALIDATED_LIMIT:
        _VALIDATED.clear()
        _validated_bytes = 0
    problem = _VALIDATED[key] = _validate(raw)
    _validated_bytes += len(key)
    return problem


def _validate(raw: dict[str, Any]) -> str | None:
    from fhir.resources import get_fhir_model_class as r5_model
    from fhir.resources.R4B import get_fhir_model_class as r4_model

    errors: list[str] = []
    for lookup in (r4_model, r5_model):
        try:
            lookup(str(raw.get("resourceType"))).model_validate(raw)
            return None
        except (ValidationError, KeyError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - the models raise TypeError on some shapes (e.g. a contained
            # resource whose resourceType is a number); a validator fault is a validation failure, not a crash
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    return errors[0]
