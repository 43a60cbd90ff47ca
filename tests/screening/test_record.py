"""Reading the patient's record into facts (cds/screening/record.py): what counts, what is left out, and the 412
when there is no Patient."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from cds.errors import DataUnavailable
from cds.fhir.json import SNOMED
from cds.fhir.prefetch import Gathered
from cds.screening.record import (
    build_record,
    read_allergy,
    read_condition,
    read_medication,
    read_observation,
    read_patient,
)

PREGNANCY = {"coding": [{"system": SNOMED, "code": "77386006", "display": "Pregnancy"}]}
TODAY = date(2026, 3, 2)


def condition(**more: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c1", "code": PREGNANCY,
            "clinicalStatus": {"coding": [{"code": "active"}]}, **more}


def test_patient_sex_and_age() -> None:
    woman = read_patient({"id": "p", "gender": "female", "birthDate": "1990-03-03"}, "fallback")
    assert woman.id == "p" and woman.may_be_pregnant and woman.age(TODAY) == 35
    man = read_patient({"gender": "male"}, "fallback")
    assert man.id == "fallback" and not man.may_be_pregnant and man.age(TODAY) is None
    birth_sex = {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"}
    assert read_patient({"gender": "male", "extension": [birth_sex]}, "p").may_be_pregnant


def test_a_condition_is_current_until_it_abates() -> None:
    fact = read_condition(condition(onsetDateTime="2026-01-10"))
    assert fact is not None and fact.ref == "Condition/c1" and fact.onset == date(2026, 1, 10)
    assert fact.is_current(TODAY) and fact.status_text == "active"
    abated = read_condition(condition(abatementDateTime="2026-02-01"))
    assert abated is not None and not abated.is_current(TODAY)
    resolved = read_condition(condition(clinicalStatus={"coding": [{"code": "resolved"}]}))
    assert resolved is not None and not resolved.is_current(TODAY)


@pytest.mark.parametrize("status", ["refuted", "entered-in-error"])
def test_refuted_and_mistaken_records_are_left_out(status: str) -> None:
    verification = {"coding": [{"code": status}]}
    assert read_condition(condition(verificationStatus=verification)) is None
    assert read_allergy({"resourceType": "AllergyIntolerance", "verificationStatus": verification}) is None


def test_unconfirmed_is_kept_and_said() -> None:
    fact = read_condition(condition(verificationStatus={"coding": [{"code": "provisional"}]}))
    assert fact is not None and fact.unconfirmed and fact.status_text == "active, provisional"


def test_conditions_no_rule_reads_are_skipped() -> None:
    assert read_condition(condition(), relevant=lambda concept: False) is None
    assert read_condition(condition(), relevant=lambda concept: True) is not None


def test_an_allergy_gathers_its_reactions() -> None:
    fact = read_allergy({"resourceType": "AllergyIntolerance", "id": "a1", "code": {"text": "Lidocaine"},
                         "criticality": "high", "type": "allergy", "reaction": [
                             {"substance": {"text": "lidocaine"}, "manifestation": [{"text": "Anaphylaxis"}],
                              "severity": "severe"},
                             {"manifestation": {"text": "Hives"}}, "not a reaction"]})
    assert fact is not None and fact.criticality == "high" and fact.kind == "allergy" and fact.severe
    assert [r.label for r in fact.reactions] == ["Anaphylaxis", "Hives"]
    assert fact.substances.texts == ("lidocaine",)


def test_observations_count_when_final_and_read_their_value() -> None:
    raw = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "hCG"},
           "effectiveDateTime": "2026-03-01T08:00:00Z", "valueQuantity": {"value": 250, "unit": "mIU/mL"}}
    fact = read_observation(raw)
    assert fact is not None and fact.value_number == 250.0 and fact.value_unit == "mIU/mL"
    assert fact.when == datetime(2026, 3, 1, 8, tzinfo=UTC)
    assert read_observation({**raw, "status": "preliminary"}) is None
    boolean = read_observation({**raw, "valueQuantity": None, "valueBoolean": True})
    assert boolean is not None and boolean.value_boolean is True


def test_medications_count_while_taken() -> None:
    request = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
               "medicationReference": {"reference": "Medication/warfarin"}}
    medication = {"resourceType": "Medication", "id": "warfarin", "code": {"text": "Warfarin 5 mg"}}
    fact = read_medication(request, None, {"Medication/warfarin": medication})
    assert fact is not None and fact.code.label == "Warfarin 5 mg"
    assert read_medication({**request, "status": "stopped"}) is None
    assert read_medication({**request, "doNotPerform": True}) is None


def test_the_record_is_read_once_per_resource() -> None:
    patient = {"resourceType": "Patient", "id": "p", "gender": "female"}
    gathered = Gathered({"patient": [patient], "conditions": [condition(), condition(), {"resourceType": "Nope"}]},
                        {"allergies": "the FHIR server timed out"}, set(), [])
    record = build_record(gathered, "p", {"ServiceRequest/sr"})
    assert record.patient.id == "p" and len(record.conditions) == 1
    assert record.unavailable == {"Allergies and intolerances": "the FHIR server timed out"}


@pytest.mark.parametrize(("patient", "why"), [
    ([], "the EHR sent no data for the patient"),
    ([{"resourceType": "Bundle"}], "the EHR sent Bundle where a Patient belongs"),
])
def test_no_patient_is_a_412(patient: list[dict[str, Any]], why: str) -> None:
    with pytest.raises(DataUnavailable) as raised:
        build_record(Gathered({"patient": patient}, {}, set(), []), "p", set())
    assert why in raised.value.message and raised.value.status == 412
