"""The tolerant FHIR JSON readers (cds/fhir/json.py): what they make of well-formed and of slipshod JSON."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from cds.fhir.json import (
    ICD10CM,
    LOINC,
    SNOMED,
    Coded,
    Coding,
    choice_date,
    coded,
    fold,
    listed,
    norm_system,
    parse_date,
    parse_instant,
    ref_key,
    reference,
    status_code,
    strip_accents,
)


@pytest.mark.parametrize(("system", "expected"), [
    ("http://snomed.info/sct", SNOMED), ("http://snomed.info/sct/", SNOMED),
    ("urn:oid:2.16.840.1.113883.6.96", SNOMED), ("urn:oid:2.16.840.1.113883.6.1", LOINC),
    ("http://hl7.org/fhir/sid/icd-10", ICD10CM), ("http://fhir.de/CodeSystem/bfarm/icd-10-gm", ICD10CM),
    ("urn:oid:2.16.840.1.113883.6.90", ICD10CM),
    ("http://www.cms.gov/Medicare/Coding/ICD10", "http://www.cms.gov/Medicare/Coding/ICD10"),  # ICD-10-PCS
    ("http://example.org/local", "http://example.org/local"), (None, ""), ("", ""),
])
def test_code_systems_are_read_by_their_canonical_uri(system: str | None, expected: str) -> None:
    assert norm_system(system) == expected


def test_a_codeable_concept_keeps_its_codings_and_text() -> None:
    value = coded({"coding": [{"system": "http://snomed.info/sct/", "code": "77386006", "display": "Pregnancy"},
                              "not a coding"], "text": "Pregnant"})
    assert value.codings == (Coding(SNOMED, "77386006", "Pregnancy"),)
    assert value.texts == ("Pregnant",) and value.label == "Pregnant"
    assert value.all_texts() == ["Pregnant", "Pregnancy"]


def test_the_same_json_gives_the_same_concept_object() -> None:
    raw = {"coding": [{"system": SNOMED, "code": "77386006"}], "text": "Pregnancy"}
    assert coded(raw) is coded(dict(raw))  # memoised: a concept is classified once per process


@pytest.mark.parametrize(("value", "codings", "texts"), [
    ("lidocaine", (), ("lidocaine",)),
    ({"system": SNOMED, "code": "387713003", "display": "Surgical procedure"},
     (Coding(SNOMED, "387713003", "Surgical procedure"),), ()),  # a bare Coding
    ({"concept": {"text": "Penicillin"}, "reference": {"display": "Amoxicillin"}}, (), ("Penicillin", "Amoxicillin")),
    ([{"text": "a"}, "b"], (), ("a", "b")),
    (None, (), ()), (7, (), ()), ({"coding": 5, "text": ["x"]}, (), ()),
])
def test_concept_shapes(value: object, codings: tuple[Coding, ...], texts: tuple[str, ...]) -> None:
    c = coded(value)
    assert (c.codings, c.texts) == (codings, texts)


def test_label_falls_back_to_display_then_code() -> None:
    assert Coded((Coding(SNOMED, "1", ""), Coding(SNOMED, "2", "Two")), ()).label == "Two"
    assert Coded((Coding(SNOMED, "1", ""),), ()).label == "1"
    assert Coded().label == "(no code or text)"


def test_text_is_folded_for_matching() -> None:
    assert fold("  Mésothérapie\tdu  VISAGE ") == "mesotherapie du visage"
    assert strip_accents("Đái tháo đường") == "Dai thao duong"
    assert fold("Straße Łódź") == "strasse lodz"


def test_listed_tolerates_a_lone_object_and_ignores_scalars() -> None:
    assert listed([1, 2]) == [1, 2] and listed({"a": 1}) == [{"a": 1}]
    assert listed("x") == [] and listed(None) == [] and listed(3) == []


@pytest.mark.parametrize(("value", "expected"), [
    ("active", "active"),
    ({"coding": [{"system": "x", "code": ""}, {"code": "resolved"}]}, "resolved"),
    ({"text": "  Active "}, "active"),
    (None, None), (5, None),
])
def test_status_code(value: object, expected: str | None) -> None:
    assert status_code(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-03-02", date(2026, 3, 2)), ("2026-03-02T09:00:00+07:00", date(2026, 3, 2)),
    ("2026-03", date(2026, 3, 1)), ("2026", date(2026, 1, 1)),
    ("2026-02-30", None), ("yesterday", None), (20260302, None), (None, None),
])
def test_partial_and_bad_dates(value: object, expected: date | None) -> None:
    assert parse_date(value) == expected


def test_instants_are_aware_and_dates_sort_at_midnight_utc() -> None:
    assert parse_instant("2026-03-02T09:00:00+07:00") == datetime(2026, 3, 2, 9, tzinfo=timezone(timedelta(hours=7)))
    assert parse_instant("2026-03-02T09:00:00Z") == datetime(2026, 3, 2, 9, tzinfo=UTC)
    assert parse_instant("2026-03-02T09:00:00") == datetime(2026, 3, 2, 9, tzinfo=UTC)
    assert parse_instant("2026-03-02") == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_instant("garbage") is None and parse_instant(None) is None


def test_choice_dates() -> None:
    assert choice_date({"onsetDateTime": "2026-01-05"}, "onset") == (True, date(2026, 1, 5))
    period = {"onsetPeriod": {"start": "2025-12-01", "end": "2026-01-05"}}
    assert choice_date(period, "onset") == (True, date(2025, 12, 1))
    assert choice_date(period, "onset", end=True) == (True, date(2026, 1, 5))
    assert choice_date({"onsetString": "as a child"}, "onset") == (True, None)  # present, no date
    assert choice_date({}, "onset") == (False, None)


@pytest.mark.parametrize(("ref", "key"), [
    ("ServiceRequest/sr-1", "ServiceRequest/sr-1"),
    ("https://ehr.example/fhir/ServiceRequest/sr-1", "ServiceRequest/sr-1"),
    ("https://ehr.example/fhir/ServiceRequest/sr-1/_history/2", "ServiceRequest/sr-1"),
    ("urn:uuid:1234", "urn:uuid:1234"),
])
def test_reference_keys(ref: str, key: str) -> None:
    assert ref_key(ref) == key


def test_reference_reads_only_a_string_reference() -> None:
    assert reference({"reference": "Patient/p"}) == "Patient/p"
    assert reference({"reference": 5}) is None and reference("Patient/p") is None


def test_iso_is_isoformat_for_dates_and_datetimes() -> None:
    from cds.fhir.json import iso

    day = date(2026, 10, 2)
    assert iso(day) == "2026-10-02" and iso(date(2026, 10, 2)) == "2026-10-02"
    utc = datetime(2026, 10, 2, 10, 0, tzinfo=UTC)
    plus_one = datetime(2026, 10, 2, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert utc == plus_one  # the same instant: equal, yet written differently
    assert (iso(utc), iso(plus_one)) == (utc.isoformat(), plus_one.isoformat())
