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

from ..errors import DataUnavailable
from ..fhir.json import (
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
from ..fhir.prefetch import LABELS, Gathered

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
    one stays interpreted, many times the cost of building the object (bench/README.md).
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
        return not (self.abated and (self.abatement is None or self.abatement <= today))

    @property
    def status_text(self) -> str:
        parts = [self.clinical or "clinical status not recorded"]
        if self.verification:
            parts.append(self.verification)
        return ", ".join(parts)


class AllergyFact(Fact):
    __slots__ = ("substances", "criticality", "manifestations", "reactions", "kind", "severe")

    def __init__(self, resource_type: str, id: str, code: Coded, raw: dict[str, Any], clinical: str | None = None,
                 verification: str | None = None, onset: date | None = None, recorded: date | None = None,
                 substances: Coded = EMPTY, criticality: str | None = None, manifestations: Coded = EMPTY,
                 reactions: list[Coded] | None = None, kind: str | None = None, severe: bool = False) -> None:
        super().__init__(resource_type, id, code, raw, clinical=clinical, verification=verification, onset=onset,
                         recorded=recorded)
        self.substances = substances
        self.criticality = criticality
        self.manifestations = manifestations  # every reaction's manifestations, merged
        self.reactions = reactions if reactions is not None else []  # each manifestation on its own
        self.kind = kind  # "allergy", "intolerance" or None (R4 code, R5 CodeableConcept)
        self.severe = severe  # some reaction.severity is "severe"

    @property
    def agent(self) -> Coded:
        return self.code.merged(self.substances)


class ObservationFact(Fact):
    __slots__ = ("when", "status", "value", "value_boolean", "value_number", "value_unit", "value_date")

    def __init__(self, resource_type: str, id: str, code: Coded, raw: dict[str, Any], when: datetime | None = None,
                 status: str | None = None, value: Coded = EMPTY, value_boolean: bool | None = None,
                 value_number: float | None = None, value_unit: str = "", value_date: date | None = None) -> None:
        super().__init__(resource_type, id, code, raw, onset=when.date() if when else None)
        self.when = when
        self.status = status
        self.value = value
        self.value_boolean = value_boolean
        self.value_number = value_number  # valueQuantity.value (an hCG level, a gestational age)
        self.value_unit = value_unit  # valueQuantity.code or .unit, as sent
        self.value_date = value_date  # valueDateTime (an estimated delivery date)


class Patient:
    __slots__ = ("id", "gender", "birth_date", "female_sex")

    def __init__(self, id: str, gender: str | None, birth_date: date | None, female_sex: bool = False) -> None:
        self.id = id
        self.gender = gender  # administrative gender
        self.birth_date = birth_date
        self.female_sex = female_sex  # a recorded birth sex or sex for clinical use of female

    @property
    def may_be_pregnant(self) -> bool:
        """Nothing in the record rules out a capacity for pregnancy: not recorded as male, or male with a female
        birth sex or sex for clinical use."""
        return self.gender != "male" or self.female_sex

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
        female_sex=_female_sex(listed(raw.get("extension"))),
    )


# Extensions that record a sex relevant to pregnancy, whatever the administrative gender: US Core birth sex
# (valueCode F), US Core sex (valueCode or Coding 248152002 Female), the R5 / cross-version sex parameter for
# clinical use (value "female-typical") and recorded sex or gender (its nested `value`).
_SEX_EXTENSIONS = ("birthsex", "us-core-sex", "sexparameterforclinicaluse", "sex-parameter-for-clinical-use",
                   "recordedsexorgender", "clinical-sex")
_FEMALE_VALUES = {"f", "female", "female-typical", "248152002", "female sex", "weiblich", "feminin", "nu"}


def _female_sex(extensions: list[Any]) -> bool:
    for ext in extensions:
        if not isinstance(ext, dict) or not isinstance(ext.get("url"), str):
            continue
        url = ext["url"].lower()
        if not any(name in url for name in _SEX_EXTENSIONS):
            continue
        values = [v for k, v in ext.items() if k.startswith("value")]
        for inner in listed(ext.get("extension")):  # complex extensions carry the sex in a nested `value`
            if isinstance(inner, dict) and inner.get("url") in ("value", "type"):
                values.extend(v for k, v in inner.items() if k.startswith("value") and inner.get("url") == "value")
        for value in values:
            if isinstance(value, str) and value.strip().lower() in _FEMALE_VALUES:
                return True
            c = coded(value)
            if any(x.code.lower() in _FEMALE_VALUES or x.display.lower() in _FEMALE_VALUES for x in c.codings):
                return True
            if any(t.strip().lower() in _FEMALE_VALUES for t in c.texts):
                return True
    return False


def _id(raw: dict[str, Any]) -> str:
    return str(raw.get("id") or "(no id)")


Relevant = Callable[[Coded], bool]  # does any rule care about this concept? (skips reading the rest)
Medications = dict[str, dict[str, Any]]  # `Medication/id` -> Medication resources from the same Bundles


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
    reactions: list[Coded] = []
    severe = False
    for reaction in listed(raw.get("reaction")):
        if isinstance(reaction, dict):
            substances = substances.merged(coded(reaction.get("substance")))
            for manifestation in listed(reaction.get("manifestation")):
                one = coded(manifestation)
                reactions.append(one)
                manifestations = manifestations.merged(one)
            severe = severe or reaction.get("severity") == "severe"
    criticality = raw.get("criticality")
    kind = status_code(raw.get("type"))
    return AllergyFact(
        str(raw.get("resourceType")), _id(raw), coded(raw.get("code")), raw,
        clinical=status_code(raw.get("clinicalStatus")),
        verification=verification,
        onset=choice_date(raw, "onset")[1],
        recorded=parse_date(raw.get("recordedDate")),
        substances=substances,
        criticality=criticality if isinstance(criticality, str) else None,
        manifestations=manifestations,
        reactions=reactions,
        kind=kind,
        severe=severe,
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
    number: float | None = None
    unit = ""
    value_date = None
    if value_choice is not None:
        kind, v = value_choice
        if kind == "Boolean" and isinstance(v, bool):
            value_boolean = v
        elif kind in ("CodeableConcept", "String", "Coding"):
            value = coded(v)
        elif kind in ("Quantity", "Integer"):
            number, unit = _quantity(v)
        elif kind in ("DateTime", "Date"):
            value_date = parse_date(v)
    return ObservationFact(str(raw.get("resourceType")), _id(raw), code, raw, when=when, status=status,
                           value=value, value_boolean=value_boolean, value_number=number, value_unit=unit,
                           value_date=value_date)


def _quantity(value: Any) -> tuple[float | None, str]:
    """(number, unit) of a Quantity (or a bare integer); a comparator like "<" or ">" keeps the bound."""
    if isinstance(value, bool):
        return None, ""
    if isinstance(value, (int, float)):
        return float(value), ""
    if not isinstance(value, dict):
        return None, ""
    number = value.get("value")
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return None, ""
    unit = value.get("code") if isinstance(value.get("code"), str) else value.get("unit")
    return float(number), unit if isinstance(unit, str) else ""


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


_UNKNOWN = object()
_VALIDATED: dict[bytes, str | None] = {}  # a resource's JSON -> problem; a record is sent again at every hook call
_VALIDATED_LIMIT = 32 * 1024 * 1024  # bytes of JSON remembered, then the memo starts again
_validated_bytes = 0


def validate_evidence(raw: dict[str, Any]) -> str | None:
    """Validate one evidence resource against R4 (R4B models), then R5; the problem, if neither accepts it.

    Full validation costs more than the rest of a hook call, so the outcome is remembered, keyed by the
    resource's own JSON: the same record comes back at order-select, again as orders are edited, and at
    order-sign. The JSON itself is the key (no digest, so no collisions), and it is cheaper than hashing it
    (bench/README.md, "Measurements behind the code").
    """
    global _validated_bytes
    try:
        key = orjson.dumps(raw)
    except TypeError:
        return "the resource is not plain JSON"
    known = _VALIDATED.get(key, _UNKNOWN)  # one lookup: hashing the key reads all of its bytes
    if known is not _UNKNOWN:
        return known if isinstance(known, str) else None
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


# The resource types read into facts (`_read`): the three medication types are the medications.
READ_TYPES = frozenset({"Condition", "AllergyIntolerance", "Observation", "MedicationRequest", "MedicationStatement",
                        "MedicationOrder"})


def _read(record: PatientRecord, rtype: str, raw: dict[str, Any], relevant: Relevant | None,
          medications: Medications) -> None:
    """Read one resource of a type in READ_TYPES into its list of the record (direct calls: compiled, a call
    through a table of readers costs a Python-level call each)."""
    if rtype == "Condition":
        if (fact := read_condition(raw, relevant, medications)) is not None:
            record.conditions.append(fact)
    elif rtype == "Observation":
        if (obs := read_observation(raw, relevant, medications)) is not None:
            record.observations.append(obs)
    elif rtype == "AllergyIntolerance":
        if (allergy := read_allergy(raw, relevant, medications)) is not None:
            record.allergies.append(allergy)
    elif (med := read_medication(raw, relevant, medications)) is not None:
        record.medications.append(med)


def build_record(gathered: Gathered, patient_id: str, draft_ids: set[str],
                 relevant: Relevant | None = None) -> PatientRecord:
    """Read the gathered resources into facts; 412 when the Patient itself could not be obtained.

    With `relevant`, Conditions, Observations and medications whose code no rule looks at are skipped after
    reading only their code (allergies are always read: every allergy counts).
    """
    patients = [r for r in gathered.data.get("patient", []) if r.get("resourceType") == "Patient"]
    if not patients:
        kinds = sorted({k for r in gathered.data.get("patient", []) if isinstance(k := r.get("resourceType"), str)
                        and k.isalnum()})
        why = gathered.unavailable.get("patient", f"the EHR sent {', '.join(kinds)} where a Patient belongs"
                                       if kinds else "the EHR sent no data for the patient")
        raise DataUnavailable(f"The Patient resource could not be obtained: {why}.", expression="prefetch.patient")
    record = PatientRecord(patient=read_patient(patients[0], patient_id), draft_ids=draft_ids)
    record.unavailable = {LABELS[k]: why for k, why in gathered.unavailable.items() if k != "patient"}
    medications = {f"Medication/{r.get('id')}": r for resources in gathered.data.values() for r in resources
                   if r.get("resourceType") == "Medication"}
    seen: set[str] = set()
    for key, resources in gathered.data.items():
        if key == "patient":
            continue
        for raw in resources:
            rtype = raw.get("resourceType")
            if type(rtype) is not str or rtype not in READ_TYPES:
                continue
            if rid := raw.get("id"):
                ident = f"{rtype}/{rid}"
                if ident in seen:
                    continue
                seen.add(ident)
            _read(record, rtype, raw, relevant, medications)
    return record
