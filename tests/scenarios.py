"""The scenario corpus (fixtures/scenarios/*.json), read once for every test that runs it.

A scenario is a whole hook request (or a raw body), the path it is sent to, and what it must give: an HTTP
status and, for 200, the indicator of each rule's card (`cards`: rule id -> indicator, `alternatives`: other
acceptable sets). The black-box test sends it to the running service (tests/integration/test_scenarios.py); the
unit test runs it through the screening in process (tests/screening/test_rules.py). Both compare with `differences`,
so a failure names the rule and what differed instead of dumping the response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import FIXTURES, with_dates

SCENARIOS = sorted((FIXTURES / "scenarios").glob("*.json"))
LEGACY_PATH = "/cds-services/mesotherapy-contraindications"


@dataclass
class Scenario:
    name: str
    data: dict[str, Any]  # dates resolved

    @classmethod
    def load(cls, path: Path) -> Scenario:
        return cls(path.stem, with_dates(json.loads(path.read_text(encoding="utf-8"))))

    @property
    def path(self) -> str:
        return str(self.data.get("path", LEGACY_PATH))

    @property
    def service_id(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def request(self) -> dict[str, Any] | None:
        return self.data.get("request")

    @property
    def expect(self) -> dict[str, Any]:
        return dict(self.data["expect"])

    @property
    def status(self) -> int:
        return int(self.expect["status"])

    @property
    def needs_fhir_server(self) -> bool:
        return "fhir" in self.data

    @property
    def acceptable(self) -> list[dict[str, str]] | None:
        """The acceptable sets of rule id -> indicator; None when only "answers 200" is specified."""
        if self.expect.get("cards") is None:
            return None
        return [self.expect["cards"], *self.expect.get("alternatives", [])]


def assert_no_empty_values(value: object, path: str = "$") -> None:
    """CDS Hooks "Use of JSON": no null, "", [] or {} anywhere (the response's own `cards: []` aside)."""
    assert value not in (None, "", [], {}), f"empty value at {path}"
    if isinstance(value, dict):
        for k, v in value.items():
            assert_no_empty_values(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_empty_values(v, f"{path}[{i}]")


def card_topics(cards: list[dict[str, Any]]) -> dict[str, str]:
    """Rule id (the card's topic) -> indicator; a rule that gives two cards fails."""
    found: dict[str, str] = {}
    for card in cards:
        topic = card["source"]["topic"]["code"]
        assert topic not in found, f"two cards for rule {topic}"
        found[topic] = card["indicator"]
    return found


def topics(response: Any) -> dict[str, str]:
    """`card_topics` of an HTTP response's cards."""
    return card_topics(response.json()["cards"])


def differences(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """One line per rule whose card differs: `rule R: expected warning, got critical` (or no card)."""
    return [f"rule {rule}: expected {expected.get(rule, 'no card')}, got {got.get(rule, 'no card')}"
            for rule in sorted(expected.keys() | got.keys()) if expected.get(rule) != got.get(rule)]


def check_cards(scenario: Scenario, got: dict[str, str]) -> None:
    """Fail with the scenario's name and, for the closest acceptable set, each rule that differs."""
    acceptable = scenario.acceptable
    assert acceptable is not None
    if got in acceptable:
        return
    closest = min(acceptable, key=lambda expected: len(differences(expected, got)))
    lines = differences(closest, got)
    raise AssertionError(f"scenario {scenario.name}: " + "; ".join(lines)
                         + (f" ({len(acceptable) - 1} alternative sets also rejected)" if len(acceptable) > 1 else ""))
