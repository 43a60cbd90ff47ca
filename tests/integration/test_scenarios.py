"""The scenario corpus: whole hook requests sent to the running service, and the cards they must produce."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

import cds

from conftest import FIXTURES, with_dates

SCENARIOS = sorted((FIXTURES / "scenarios").glob("*.json"))


def assert_no_empty_values(value: object, path: str = "$") -> None:
    """CDS Hooks "Use of JSON": no null, "", [] or {} anywhere (the response's own `cards: []` aside)."""
    assert value not in (None, "", [], {}), f"empty value at {path}"
    if isinstance(value, dict):
        for k, v in value.items():
            assert_no_empty_values(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_empty_values(v, f"{path}[{i}]")


def topics(response: httpx.Response) -> dict[str, str]:
    cards = response.json()["cards"]
    found: dict[str, str] = {}
    for card in cards:
        topic = card["source"]["topic"]["code"]
        assert topic not in found, f"two cards for topic {topic}"
        found[topic] = card["indicator"]
    return found


def test_the_service_runs_the_build_the_tests_run(client: httpx.Client) -> None:
    assert client.get("/readyz").json()["build"] == ("compiled" if cds.COMPILED else "interpreted")


def test_corpus_is_large_enough() -> None:
    assert len(SCENARIOS) >= 30


FHIR_TOKEN = "fhir-test-token"  # conftest's fhir_server requires it


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, client: httpx.Client, request: pytest.FixtureRequest) -> None:
    scenario = with_dates(json.loads(path.read_text(encoding="utf-8")))
    url = scenario.get("path", "/cds-services/mesotherapy-contraindications")
    fhir = None
    if "fhir" in scenario:  # the fetch path: the record is on a real FHIR server, not in prefetch
        fhir = request.getfixturevalue("fhir_server")
        fhir.reset()
        fhir.load(scenario["fhir"])
        scenario["request"].update(fhirServer=fhir.base_url, fhirAuthorization={
            "access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read",
            "subject": "meso-cds"})
    if "raw_body" in scenario:
        response = client.post(url, content=scenario["raw_body"].encode(), headers={"Content-Type": "application/json"})
    else:
        response = client.post(url, json=scenario["request"])
    expect = scenario["expect"]
    assert response.status_code == expect["status"], response.text
    if expect["status"] != 200:
        assert response.json()["resourceType"] == "OperationOutcome"
        return
    for card in response.json()["cards"]:
        assert_no_empty_values(card)
    if expect["cards"] is None:  # only "answers 200 without crashing" is specified
        assert isinstance(response.json()["cards"], list)
        return
    acceptable = [expect["cards"], *expect.get("alternatives", [])]
    assert topics(response) in acceptable, json.dumps(response.json(), indent=1)[:3000]
    if fhir is not None and "reads" in expect:
        read = {next(part for part in urlsplit(r["path"]).path.split("/") if part[:1].isupper())
                for r in fhir.requests() if r["method"] == "GET"}
        assert read <= set(expect["reads"]), read
