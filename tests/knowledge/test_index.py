"""The compiled match index must give exactly the answers of matching each value set on its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from cds.fhir.json import coded
from cds.knowledge.loader import load_knowledge

from conftest import FIXTURES, ROOT

KB = load_knowledge(ROOT / "cards")
FAMILY_HISTORY = "family-history"  # the value set marked about_relatives in cards/


def concepts() -> Iterator[Any]:
    """Every code, medication and observation value in the scenario corpus, as the service reads them."""
    for path in sorted((FIXTURES / "scenarios").glob("*.json")):
        scenario = json.loads(path.read_text())
        prefetch = scenario.get("request", {}).get("prefetch") or {}
        for value in prefetch.values():
            entries = value.get("entry", []) if isinstance(value, dict) else []
            for entry in entries:
                resource = entry.get("resource", {}) if isinstance(entry, dict) else {}
                for key in ("code", "medicationCodeableConcept", "valueCodeableConcept", "bodySite"):
                    if key in resource:
                        yield coded(resource[key])


def test_index_agrees_with_each_value_set_alone() -> None:
    checked = 0
    for concept in concepts():
        hits = KB.index.hits(concept)
        expected = {vs.id for vs in KB.valuesets.values() if vs.match_slow(concept) is not None}
        if FAMILY_HISTORY in expected:
            expected = {FAMILY_HISTORY}
        assert set(hits) == expected, concept
        checked += 1
    assert checked > 1000


def test_excluded_codes_rule_a_value_set_out_even_with_matching_text() -> None:
    suppressed = coded({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "O92.5",
                                    "display": "Suppressed lactation"}], "text": "lactation"})
    assert KB.vs("breastfeeding-conditions").match(suppressed) is None


def test_family_history_matches_nothing_else() -> None:
    fh = coded({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "Z80.3",
                            "display": "Family history of malignant neoplasm of breast"}]})
    assert set(KB.index.hits(fh)) == {FAMILY_HISTORY}


def test_negated_and_relative_mentions_do_not_match() -> None:
    for text in ("Not pregnant", "Pregnant: No", "denies pregnancy", "pregnancy ruled out", "Nicht schwanger",
                 "Pas enceinte"):
        assert KB.vs("pregnancy-conditions").match(coded(text)) is None, text
    for text in ("Breast cancer in mother", "Sister - breast cancer", "FH: colon cancer", "Cancerophobia"):
        assert KB.vs("cancer").match(coded(text)) is None, text
    assert KB.vs("cancer").match(coded("Brustkrebs in der Vorgeschichte")) is not None
    assert KB.vs("pregnancy-conditions").match(coded("Pregnant, 12 weeks")) is not None


def test_body_sites_nest_and_the_most_specific_is_named() -> None:
    sites = KB.sites
    assert sites.lineage("upper-chest") == {"upper-chest", "chest", "trunk", "body"}
    assert sites.overlap({"cheek"}, {"head"}) and sites.overlap({"head"}, {"cheek"})
    assert not sites.overlap({"cheek"}, {"scalp"})
    assert sites.classify(coded("Mesotherapy of the scalp")) == {"scalp"}
    assert sites.classify(coded("lower leg and leg")) == {"lower-leg"}  # the leg is implied
    assert sites.classify(coded("nothing anatomical")) == set()


def test_the_orderable_text_matcher_ignores_negated_mentions() -> None:
    assert KB.orderable_text.search("Mésothérapie visage") == "Mésothérapie visage"
    assert KB.orderable_text.search("no mesotherapy") is None
