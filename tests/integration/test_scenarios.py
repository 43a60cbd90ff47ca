"""The scenario corpus, black box: whole hook requests sent to the running service (`python -m cds`, as
`make run` starts it), and the cards they must produce. The same corpus runs in process, through the screening
alone, in tests/screening/test_rules.py; this run adds the HTTP layer, the fast path and the fetch path."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

import cds

from scenarios import SCENARIOS, Scenario, assert_no_empty_values, check_cards, topics


def test_the_service_runs_the_build_the_tests_run(client: httpx.Client) -> None:
    assert client.get("/readyz").json()["build"] == ("compiled" if cds.COMPILED else "interpreted")


def test_corpus_is_large_enough() -> None:
    assert len(SCENARIOS) >= 30


FHIR_TOKEN = "fhir-test-token"  # conftest's fhir_server requires it


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, client: httpx.Client, request: pytest.FixtureRequest) -> None:
    scenario = Scenario.load(path)
    where = f"scenario {scenario.name}"
    fhir = None
    if scenario.needs_fhir_server:  # the fetch path: the record is on a real FHIR server, not in prefetch
        fhir = request.getfixturevalue("fhir_server")
        fhir.reset()
        fhir.load(scenario.data["fhir"])
        scenario.data["request"].update(fhirServer=fhir.base_url, fhirAuthorization={
            "access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read",
            "subject": "meso-cds"})
    if "raw_body" in scenario.data:
        response = client.post(scenario.path, content=scenario.data["raw_body"].encode(),
                               headers={"Content-Type": "application/json"})
    else:
        response = client.post(scenario.path, json=scenario.request)
    assert response.status_code == scenario.status, f"{where}: expected {scenario.status}, got " \
                                                    f"{response.status_code}: {response.text[:500]}"
    if scenario.status != 200:
        assert response.json()["resourceType"] == "OperationOutcome"
        return
    for i, card in enumerate(response.json()["cards"]):
        assert_no_empty_values(card, f"{where}: cards[{i}]")
    if scenario.acceptable is None:  # only "answers 200 without crashing" is specified
        assert isinstance(response.json()["cards"], list)
        return
    check_cards(scenario, topics(response))
    if fhir is not None and "reads" in scenario.expect:
        read = {next(part for part in urlsplit(r["path"]).path.split("/") if part[:1].isupper())
                for r in fhir.requests() if r["method"] == "GET"}
        assert read <= set(scenario.expect["reads"]), f"{where}: read {sorted(read)}"
