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


def test_rules_skipped_for_lack_of_data_would_have_found_nothing() -> None:
    """`rule_needs` lets evaluation skip rules: over the corpus, every skipped rule, evaluated anyway, is empty."""
    from datetime import UTC, datetime

    from cds.errors import CDSError
    from cds.fhir.client import entries
    from cds.fhir.prefetch import Gathered
    from cds.knowledge.policy import ClinicalPolicy
    from cds.requests import validate_request
    from cds.screening.orders import draft_resources, find_mesotherapy
    from cds.screening.record import build_record
    from cds.screening.rules import Evaluation, rule_needs
    from cds.settings import Settings

    policy, today = ClinicalPolicy.from_settings(Settings(env="dev")), datetime.now(UTC).date()
    needs = rule_needs(KB)
    skipped = fired = 0
    for path in sorted((FIXTURES / "scenarios").glob("*.json")):
        request = json.loads(path.read_text()).get("request")
        if request is None or request.get("hook") not in ("order-select", "order-sign"):
            continue  # raw-body scenarios: bad input; the hooks beyond orders reach the same rules (other tests)
        context = request["context"]
        try:
            drafts = draft_resources(validate_request(request)["context"]["draftOrders"])
            orders = find_mesotherapy(KB, request["hook"], drafts, context.get("selections"))
        except CDSError:
            continue  # bad input never reaches the rules
        prefetch = request.get("prefetch") or {}
        data = {key: entries(value) if value.get("resourceType") == "Bundle" else [value]
                for key, value in prefetch.items() if isinstance(value, dict)}
        if not orders or not any(r.get("resourceType") == "Patient" for r in data.get("patient", [])):
            continue
        record = build_record(Gathered(data, {}, set(), []), context["patientId"], set(drafts.resources))
        evaluation = Evaluation(KB, record, orders, today, policy)
        present = evaluation._present()
        for rule in KB.rules:
            if needs[rule.id] is not None and needs[rule.id].isdisjoint(present):
                assert evaluation._node(rule, rule.when) == [], (path.name, rule.id)
                skipped += 1
            else:
                fired += bool(evaluation._node(rule, rule.when))
    assert skipped > 1000 and fired > 200, (skipped, fired)
