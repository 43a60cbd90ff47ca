"""Issue 17, silent mode: a silent rule's card is computed, recorded in the audit store and counted, and never
returned; the summary and the metrics keep silent and shown apart. In process (conftest.in_process); that an
unknown rule in the setting stops `python -m cds` is tests/integration/test_startup.py."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cds.errors import ConfigError

from conftest import ROOT, dev_settings, in_process, load_fixture

pytestmark = pytest.mark.anyio

SERVICE = "/cds-services/mesotherapy-contraindications"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def topics(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {c["source"]["topic"]["code"]: c["indicator"] for c in response.json()["cards"]}


async def summary(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await api.get("/feedback/summary")
    assert response.status_code == 200
    return {r["rule"]: r for r in response.json()["rules"]}


async def samples(api: httpx.AsyncClient) -> Samples:
    """The metrics (one registry per process: the tests compare before and after)."""
    text = (await api.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def stored(data_dir: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(data_dir / "cds.sqlite3") as db:
        return sorted(db.execute("SELECT rule_id, silent FROM issued_cards").fetchall())


async def test_a_rule_silenced_by_setting_is_recorded_and_counted_not_returned(tmp_path: Path) -> None:
    request = load_fixture("requests/order-select-example.json")
    async with in_process(dev_settings(silent_rules=["allergy-history"], data_dir=tmp_path)) as api:
        before = await samples(api)
        for _ in range(3):
            assert topics(await api.post(SERVICE, json=request)) == {"pregnancy": "critical"}
        rules = await summary(api)  # the summary first writes the cards still queued for the audit store
        assert rules["allergy-history"] == {"rule": "allergy-history", "version": "2", "issued": 0, "silent": 3,
                                            "accepted": 0, "overridden": 0, "override_reasons": {}, "suppressed": 0}
        assert rules["pregnancy"]["issued"] == 3 and rules["pregnancy"]["silent"] == 0
        after = await samples(api)
        allergy = {"indicator": "warning", "topic": "allergy-history"}
        assert grown(before, after, "cds_silent_cards_total", **allergy) == 3
        assert grown(before, after, "cds_cards_total", **allergy) == 0
        assert grown(before, after, "cds_cards_total", indicator="critical", topic="pregnancy") == 3
        assert stored(tmp_path) == [("allergy-history", 1)] * 3 + [("pregnancy", 0)] * 3


async def test_feedback_cannot_name_a_silent_card(tmp_path: Path) -> None:
    request = load_fixture("requests/order-select-example.json")
    async with in_process(dev_settings(silent_rules=["allergy-history"], data_dir=tmp_path)) as api:
        await api.post(SERVICE, json=request)
        await summary(api)
        with sqlite3.connect(tmp_path / "cds.sqlite3") as db:
            (uuid,) = db.execute("SELECT uuid FROM issued_cards WHERE silent").fetchone()
        entry = {"card": uuid, "outcome": "overridden", "outcomeTimestamp": "2026-11-21T09:00:00Z"}
        response = await api.post(SERVICE + "/feedback", json={"feedback": [entry]})
        assert response.status_code == 400
        assert response.json()["issue"][0]["expression"] == ["feedback[0].card"]


def _cards_with(tmp_path: Path, rule: str) -> Path:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    path = cards / "rules" / f"{rule}.yaml"
    text = path.read_text(encoding="utf-8")
    assert "\nstatus: active\n" in text
    path.write_text(text.replace("\nstatus: active\n", "\nstatus: silent\n"), encoding="utf-8")
    return cards


async def test_status_silent_in_cards_and_its_per_deployment_override(tmp_path: Path) -> None:
    cards = _cards_with(tmp_path, "pregnancy")
    request = load_fixture("requests/order-select-example.json")
    async with in_process(dev_settings(knowledge_dir=cards, data_dir=tmp_path / "a")) as api:
        assert topics(await api.post(SERVICE, json=request)) == {"allergy-history": "warning"}
        assert (await summary(api))["pregnancy"]["silent"] == 1
        assert "status silent" in (await api.get("/knowledge/pregnancy")).text
    async with in_process(dev_settings(knowledge_dir=cards, active_rules=["pregnancy"],
                                       data_dir=tmp_path / "b")) as api:
        assert topics(await api.post(SERVICE, json=request)) == {"pregnancy": "critical", "allergy-history": "warning"}


async def test_a_silent_rule_does_not_suppress_a_shown_one(tmp_path: Path) -> None:
    """pregnancy-status-unknown is suppressed by a breastfeeding card; with breastfeeding silent, the clinician
    sees what the shown rules give on their own: the pregnancy-status prompt."""
    scenario = load_fixture("scenarios/breastfeeding-active-condition.json")
    async with in_process(dev_settings(silent_rules=["breastfeeding"], data_dir=tmp_path)) as api:
        response = await api.post(SERVICE, json=scenario["request"])
        assert topics(response) == {"pregnancy-status-unknown": "info"}
        assert (await summary(api))["breastfeeding"]["silent"] == 1


def test_an_unknown_rule_in_the_silent_setting_is_a_configuration_error(tmp_path: Path) -> None:
    from cds.api.app import create_app

    with pytest.raises(ConfigError, match="no-such-rule"):
        create_app(dev_settings(silent_rules=["pregnancy", "no-such-rule"], data_dir=tmp_path))
