"""Every scenario of the corpus through the screening itself, in process: no HTTP, no subprocess.

The request is checked as the hook endpoint checks it (`validate_request` for the service the scenario is sent
to), then screened with its prefetch (`Screening.screen`); the cards' rule ids and indicators must be one of the
scenario's acceptable sets. A failure names the scenario and each rule that differed ("rule pregnancy: expected
critical, got no card"). The scenarios whose record is on a FHIR server (`"fhir"`) read it from the real Node FHIR
server and are marked integration; those sent as raw bytes are HTTP-layer cases (tests/api/test_hooks.py).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from cds.errors import InvalidRequest
from cds.screening.hooks import SERVICE_HOOKS, validate_request
from cds.screening.pipeline import Screening

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
        assert scenario.status == 400, f"{where}: expected {scenario.status}, got 400 ({exc.message})"
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
