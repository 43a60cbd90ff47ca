"""Issue 17, silent mode end to end: a silent rule's card is computed, recorded in the audit store and counted,
and never returned; the summary and the metrics keep silent and shown apart."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Service, load_fixture

SERVICE = "/cds-services/mesotherapy-contraindications"


def topics(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {c["source"]["topic"]["code"]: c["indicator"] for c in response.json()["cards"]}


def summary(svc: Service) -> dict[str, dict[str, Any]]:
    response = httpx.get(svc.base_url + "/feedback/summary", timeout=10)
    assert response.status_code == 200
    return {r["rule"]: r for r in response.json()["rules"]}


def samples(svc: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(svc.base_url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stored(svc: Service) -> list[tuple[str, int]]:
    with sqlite3.connect(Path(svc.env["CDS_DATA_DIR"]) / "cds.sqlite3") as db:
        return sorted(db.execute("SELECT rule_id, silent FROM issued_cards").fetchall())


def test_a_rule_silenced_by_setting_is_recorded_and_counted_not_returned(tmp_path: Path) -> None:
    request = load_fixture("requests/order-select-example.json")
    with Service({"CDS_ENV": "dev", "CDS_SILENT_RULES": "allergy-history", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        for _ in range(3):
            assert topics(httpx.post(svc.base_url + SERVICE, json=request, timeout=10)) == {"pregnancy": "critical"}
        rules = summary(svc)  # the summary first writes the cards still queued for the audit store
        assert rules["allergy-history"] == {"rule": "allergy-history", "version": "2", "issued": 0, "silent": 3,
                                            "accepted": 0, "overridden": 0, "override_reasons": {}, "suppressed": 0}
        assert rules["pregnancy"]["issued"] == 3 and rules["pregnancy"]["silent"] == 0
        metric = samples(svc)
        allergy = (("indicator", "warning"), ("topic", "allergy-history"))
        assert metric[("cds_silent_cards_total", allergy)] == 3
        assert metric.get(("cds_cards_total", allergy), 0) == 0
        assert metric[("cds_cards_total", (("indicator", "critical"), ("topic", "pregnancy")))] == 3
        assert stored(svc) == [("allergy-history", 1)] * 3 + [("pregnancy", 0)] * 3


def test_feedback_cannot_name_a_silent_card(tmp_path: Path) -> None:
    request = load_fixture("requests/order-select-example.json")
    with Service({"CDS_ENV": "dev", "CDS_SILENT_RULES": "allergy-history", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        httpx.post(svc.base_url + SERVICE, json=request, timeout=10)
        summary(svc)
        with sqlite3.connect(Path(svc.env["CDS_DATA_DIR"]) / "cds.sqlite3") as db:
            (uuid,) = db.execute("SELECT uuid FROM issued_cards WHERE silent").fetchone()
        entry = {"card": uuid, "outcome": "overridden", "outcomeTimestamp": "2026-11-21T09:00:00Z"}
        response = httpx.post(svc.base_url + SERVICE + "/feedback", json={"feedback": [entry]}, timeout=10)
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


def test_status_silent_in_cards_and_its_per_deployment_override(tmp_path: Path) -> None:
    cards = _cards_with(tmp_path, "pregnancy")
    request = load_fixture("requests/order-select-example.json")
    with Service({"CDS_ENV": "dev", "CDS_KNOWLEDGE_DIR": str(cards), "CDS_DATA_DIR": str(tmp_path / "a")}) as svc:
        assert topics(httpx.post(svc.base_url + SERVICE, json=request, timeout=10)) == {"allergy-history": "warning"}
        assert summary(svc)["pregnancy"]["silent"] == 1
        assert "status silent" in httpx.get(svc.base_url + "/knowledge/pregnancy").text
    with Service({"CDS_ENV": "dev", "CDS_KNOWLEDGE_DIR": str(cards), "CDS_ACTIVE_RULES": "pregnancy",
                  "CDS_DATA_DIR": str(tmp_path / "b")}) as svc:
        assert topics(httpx.post(svc.base_url + SERVICE, json=request, timeout=10)) == {
            "pregnancy": "critical", "allergy-history": "warning"}


def test_a_silent_rule_does_not_suppress_a_shown_one(tmp_path: Path) -> None:
    """pregnancy-status-unknown is suppressed by a breastfeeding card; with breastfeeding silent, the clinician
    sees what the shown rules give on their own: the pregnancy-status prompt."""
    scenario = load_fixture("scenarios/breastfeeding-active-condition.json")
    with Service({"CDS_ENV": "dev", "CDS_SILENT_RULES": "breastfeeding", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        response = httpx.post(svc.base_url + SERVICE, json=scenario["request"], timeout=10)
        assert topics(response) == {"pregnancy-status-unknown": "info"}
        assert summary(svc)["breastfeeding"]["silent"] == 1


def test_an_unknown_rule_in_the_silent_setting_stops_the_start(tmp_path: Path) -> None:
    svc = Service({"CDS_ENV": "dev", "CDS_SILENT_RULES": "pregnancy,no-such-rule", "CDS_DATA_DIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "cds"], cwd=ROOT, env=svc.env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "no-such-rule" in result.stderr + result.stdout
