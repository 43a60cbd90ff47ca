"""Every scenario of the corpus through the screening itself, in process: no HTTP, no subprocess.

The request is checked as the hook endpoint checks it (`validate_request` for the service the scenario is sent
to), then screened with its prefetch (`Screening.screen`); the cards' rule ids and indicators must be one of the
scenario's acceptable sets. A failure names the scenario and each rule that differed ("rule pregnancy: expected
critical, got no card"). The scenarios whose record is on a FHIR server (`"fhir"`) read it from the real Node FHIR
server and are marked integration; those sent as raw bytes are HTTP-layer cases (tests/api/test_hooks.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from cds.errors import CDSError, InvalidRequest
from cds.fhir.client import entries
from cds.fhir.prefetch import Gathered
from cds.knowledge.loader import KnowledgeBase
from cds.knowledge.policy import ClinicalPolicy
from cds.requests import validate_request
from cds.screening.hooks import SERVICE_HOOKS
from cds.screening.orders import draft_resources, find_mesotherapy
from cds.screening.pipeline import Screening
from cds.screening.record import build_record
from cds.screening.rules import Evaluation, NeedPlan, rule_needs

from conftest import dev_settings
from scenarios import SCENARIOS, Scenario, assert_no_empty_values, card_topics, check_cards

BASE_URL = "http://cds.test"
FHIR_TOKEN = "fhir-test-token"  # conftest's fhir_server requires it


def _params() -> list[object]:
    params: list[object] = []
    for path in SCENARIOS:
        scenario = Scenario.load(path)
        if scenario.request is None:
            continue  # a raw body: only the HTTP layer reads bytes
        marks = [pytest.mark.integration] if scenario.needs_fhir_server else []
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


PARAMS = _params()


def test_the_corpus_runs_in_process() -> None:
    assert len(PARAMS) >= 400 and len(SCENARIOS) - len(PARAMS) <= 5


@pytest.mark.anyio
@pytest.mark.parametrize("path", PARAMS)
async def test_scenario(path: Path, screening: Screening, request: pytest.FixtureRequest) -> None:
    scenario = Scenario.load(path)
    body = scenario.request
    assert body is not None
    where = f"scenario {scenario.name}"
    served = SERVICE_HOOKS.get(scenario.service_id)
    if served is None:
        assert scenario.status == 404, f"{where}: no service {scenario.service_id!r}, expected {scenario.status}"
        return
    fhir = None
    if scenario.needs_fhir_server:
        fhir = request.getfixturevalue("fhir_server")
        fhir.reset()
        fhir.load(scenario.data["fhir"])
        body.update(fhirServer=fhir.base_url, fhirAuthorization={
            "access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read",
            "subject": "meso-cds"})
    try:
        body = validate_request(body, served)
    except InvalidRequest as exc:
        assert scenario.status == 400, f"{where}: expected {scenario.status}, got 400 ({exc.message})"  # noqa: PT017
        return
    async with aiohttp.ClientSession() as http:
        result = await screening.screen(body, http, BASE_URL, "patient-pseudonym")
    if result.refused is not None:
        assert scenario.status == 412, f"{where}: expected {scenario.status}, got 412 ({result.refused.message})"
        return
    got = card_topics(result.cards)
    assert scenario.status == 200, f"{where}: expected {scenario.status}, got 200 with cards {got}"
    for i, card in enumerate(result.cards):
        assert_no_empty_values(card, f"{where}: cards[{i}]")
    assert len(result.keys) == len(result.cards)
    if scenario.acceptable is not None:
        check_cards(scenario, got)
    if fhir is not None and "reads" in scenario.expect:
        read = {next(part for part in urlsplit(r["path"]).path.split("/") if part[:1].isupper())
                for r in fhir.requests() if r["method"] == "GET"}
        assert read <= set(scenario.expect["reads"]), f"{where}: read {sorted(read)}"


def test_rules_skipped_for_lack_of_data_would_have_found_nothing(kb: KnowledgeBase) -> None:
    """`rule_needs` lets evaluation skip rules: over the corpus, every skipped rule, evaluated anyway, is empty."""
    policy, today = ClinicalPolicy.from_settings(dev_settings()), datetime.now(UTC).date()
    needs = rule_needs(kb)
    skipped = fired = 0
    for path in SCENARIOS:
        request = json.loads(path.read_text(encoding="utf-8")).get("request")
        if request is None or request.get("hook") not in ("order-select", "order-sign"):
            continue  # raw-body scenarios: bad input; the hooks beyond orders reach the same rules (other tests)
        context = request["context"]
        try:
            drafts = draft_resources(validate_request(request)["context"]["draftOrders"])
            orders = find_mesotherapy(kb, request["hook"], drafts, context.get("selections"))
        except CDSError:
            continue  # bad input never reaches the rules
        prefetch = request.get("prefetch") or {}
        data = {key: entries(value) if value.get("resourceType") == "Bundle" else [value]
                for key, value in prefetch.items() if isinstance(value, dict)}
        if not orders or not any(r.get("resourceType") == "Patient" for r in data.get("patient", [])):
            continue
        record = build_record(Gathered(data, {}, set(), []), context["patientId"], set(drafts.resources))
        evaluation = Evaluation(kb, record, orders, today, policy)
        present = evaluation.present()
        for rule in kb.rules:
            if needs[rule.id] is not None:  # what run() asks, pair by pair, agrees with the set
                assert evaluation.holds(NeedPlan(needs[rule.id])) is not needs[rule.id].isdisjoint(present), rule.id
            if needs[rule.id] is not None and needs[rule.id].isdisjoint(present):
                assert evaluation.evidence(rule) == [], (path.name, rule.id)
                skipped += 1
            else:
                fired += bool(evaluation.evidence(rule))
    assert skipped > 1000 and fired > 200, (skipped, fired)
