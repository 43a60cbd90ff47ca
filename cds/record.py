"""The patient's record as the rules see it: slim facts read once from raw FHIR JSON.

Status filtering that applies to every rule (refuted, entered-in-error, Observation status, medication
status) happens here, once; rules only ask "current" or "ever".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from .fhirjson import (
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


@dataclass(slots=True)
class Fact:
    """One resource, reduced to what rules match on, with the raw JSON kept for evidence validation."""

    resource_type: str
    id: str
    code: Coded
    raw: dict[str, Any]
    clinical: str | None = None
    verification: str | None = None
    onset: date | None = None
    abated: bool = False
    abatement: date | None = None
    recorded: date | None = None
    body_site: Coded = field(default_factory=Coded)

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


@dataclass(slots=True)
class AllergyFact(Fact):
    substances: Coded = field(default_factory=Coded)
    criticality: str | None = None
    manifestations: Coded = field(default_factory=Coded)

    @property
    def agent(self) -> Coded:
        return self.code.merged(self.substances)


@dataclass(slots=True)
class ObservationFact(Fact):
    when: datetime | None = None
    status: str | None = None
    value: Coded = field(default_factory=Coded)
    value_boolean: bool | None = None


@dataclass(slots=True)
class Patient:
    id: str
    gender: str | None
    birth_date: date | None

    def age(self, today: date) -> int | None:
        if self.birth_date is None:
            return None
        b = self.birth_date
        return today.year - b.year - ((today.month, today.day) < (b.month, b.day))


@dataclass(slots=True)
class PatientRecord:
    patient: Patient
    conditions: list[Fact] = field(default_factory=list)
    allergies: list[AllergyFact] = field(default_factory=list)
    observations: list[ObservationFact] = field(default_factory=list)
    medications: list[Fact] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # data label -> why it could not be had
    draft_ids: set[str] = field(default_factory=set)


def read_patient(raw: dict[str, Any], fallback_id: str) -> Patient:
    gender = raw.get("gender")
    return Patient(
        id=str(raw.get("id") or fallback_id),
        gender=gender if isinstance(gender, str) else None,
        birth_date=parse_date(raw.get("birthDate")),
    )


def _base(raw: dict[str, Any], code: Coded) -> dict[str, Any]:
    return {"resource_type": str(raw.get("resourceType")), "id": str(raw.get("id") or "(no id)"), "code": code,
            "raw": raw}


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
        **_base(raw, code),
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
        **_base(raw, coded(raw.get("code"))),
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
    return ObservationFact(
        **_base(raw, code),
        when=when, status=status, value=value, value_boolean=value_boolean,
        onset=when.date() if when else None,
    )


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
    return Fact(**_base(raw, code), clinical=status)


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


_VALIDATED: dict[bytes, str | None] = {}  # content hash -> problem; a record is sent again at every hook call
_VALIDATED_LIMIT = 20_000


def validate_evidence(raw: dict[str, Any]) -> str | None:
    """Validate one evidence resource against R4 (R4B models), then R5; the problem, if neither accepts it.

    Full validation costs ~0.5 ms a resource, so the outcome is remembered by a hash of the resource's content:
    the same record comes back at order-select, again as orders are edited, and at order-sign.
    """
    try:
        key = hashlib.blake2b(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
    except TypeError:
        return "the resource is not plain JSON"
    if key in _VALIDATED:
        return _VALIDATED[key]
    if len(_VALIDATED) >= _VALIDATED_LIMIT:
        _VALIDATED.clear()
    problem = _VALIDATED[key] = _validate(raw)
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
