"""Issue 17: the `cds` command, run as a user runs it (the installed console script, in a subprocess)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import FIXTURES, ROOT, Service, free_port
from jwks_server import JwksServer, rsa_jwk

CDS = Path(sys.executable).parent / "cds"
PREGNANT = FIXTURES / "synthetic" / "synthea-pregnant.json"
SERVICE = "/cds-services/mesotherapy-contraindications"


def cds(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    base.update({"COLUMNS": "120", **(env or {})})
    return subprocess.run([str(CDS), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=base)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cds: error: "), result.stderr


def test_help_lists_the_commands() -> None:
    result = cds("--help")
    assert result.returncode == 0
    for command in ("screen", "fire", "population", "knowledge"):
        assert command in result.stdout
    assert cds("screen", "--help").returncode == 0 and "--order" in cds("screen", "--help").stdout
    assert cds("no-such-command").returncode == 2


def test_screen_a_patient_bundle_prints_cards_as_a_clinician_reads_them() -> None:
    result = cds("screen", str(PREGNANT), "--order", "mesotherapy-face")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "CRITICAL" in out and "Mesotherapy contraindicated: active pregnancy" in out
    assert "WARNING" in out
    assert "898306f8-07ef-4d6c-975e-868524373e5c" in out  # the pregnancy Condition, as evidence
    assert "Remove the mesotherapy order" in out
    assert "\x1b[" not in out  # not a terminal: no colour codes


def test_screen_colours_on_a_terminal() -> None:
    result = cds("screen", str(PREGNANT), env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert result.returncode == 0 and "\x1b[" in result.stdout


def test_screen_a_hook_request_and_json_output() -> None:
    result = cds("screen", str(FIXTURES / "requests" / "order-select-example.json"), "--json")
    assert result.returncode == 0, result.stderr
    topics = {c["source"]["topic"]["code"]: c["indicator"] for c in json.loads(result.stdout)["cards"]}
    assert topics == {"pregnancy": "critical", "allergy-history": "warning"}


def test_screen_with_a_product_finds_the_ingredient_allergy(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1970-01-01"}},
        {"resource": {"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "Patient/p1"},
                      "clinicalStatus": {"coding": [{"code": "active"}]},
                      "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6387",
                                           "display": "lidocaine"}]}}}]}
    path = tmp_path / "lidocaine-allergy.json"
    path.write_text(json.dumps(bundle))
    with_product = json.loads(cds("screen", str(path), "--product", "lidocaine", "--json").stdout)
    assert {c["source"]["topic"]["code"]: c["indicator"] for c in with_product["cards"]}["ingredient-allergy"] == \
        "critical"
    bad = cds("screen", str(path), "--product", "unobtainium")
    assert_one_line_error(bad)
    assert "unobtainium" in bad.stderr


@pytest.mark.parametrize("content", ["this is not JSON", "{\"hello\": \"world\"}", "[1, 2]",
                                     "{\"resourceType\": \"Patient\", \"id\": \"x\"}",
                                     "{\"resourceType\": \"Bundle\", \"entry\": [{\"resource\": {}}]}",
                                     "{\"resourceType\": \"Bundle\", \"entry\": []}"])
def test_a_file_that_is_not_fhir_is_one_line_and_exit_2(tmp_path: Path, content: str) -> None:
    path = tmp_path / "input.json"
    path.write_text(content)
    assert_one_line_error(cds("screen", str(path)))


def test_a_missing_file_and_an_invalid_request_are_one_line_and_exit_2(tmp_path: Path) -> None:
    assert_one_line_error(cds("screen", str(tmp_path / "absent.json")))
    request = json.loads((FIXTURES / "requests" / "order-select-example.json").read_text())
    request["hookInstance"] = "not-a-uuid"
    path = tmp_path / "bad-request.json"
    path.write_text(json.dumps(request))
    result = cds("screen", str(path))
    assert_one_line_error(result)
    assert "hookInstance" in result.stderr


def test_fire_at_a_running_service(service: Service) -> None:
    result = cds("fire", service.base_url + SERVICE, str(PREGNANT))
    assert result.returncode == 0, result.stderr
    assert "HTTP 200" in result.stdout and "Mesotherapy contraindicated: active pregnancy" in result.stdout
    not_fhir = cds("fire", service.base_url + SERVICE, str(ROOT / "README.md"))
    assert_one_line_error(not_fhir)
    wrong = cds("fire", service.base_url + "/cds-services/nobody", str(PREGNANT))
    assert_one_line_error(wrong, code=1)
    assert "404" in wrong.stderr


def test_fire_at_nothing_is_exit_1() -> None:
    assert_one_line_error(cds("fire", f"http://127.0.0.1:{free_port()}/cds-services/x", str(PREGNANT)), code=1)


def test_fire_signs_a_jwt_that_a_production_service_accepts(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "ehr-key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    issuer = "https://ehr.example.org"
    with JwksServer() as jwks:
        url = jwks.publish("/jwks.json", {"keys": [rsa_jwk(key.public_key(), "k1")]})
        svc = Service.trusting(issuer, url, CDS_ALLOWED_FHIR_SERVERS="https://fhir.example.org")
        with svc:
            unsigned = cds("fire", svc.base_url + SERVICE, str(PREGNANT))
            assert_one_line_error(unsigned, code=1)
            assert "401" in unsigned.stderr
            signed = cds("fire", svc.base_url + SERVICE, str(PREGNANT), "--key", str(pem), "--iss", issuer,
                         "--kid", "k1")
            assert signed.returncode == 0, signed.stderr
            assert "HTTP 200" in signed.stdout and "CRITICAL" in signed.stdout
    assert_one_line_error(cds("fire", "http://127.0.0.1:1/x", str(PREGNANT), "--key", str(PREGNANT), "--iss", "i"))


def test_population_counts_per_topic_and_samples_why(tmp_path: Path) -> None:
    result = cds("population", str(FIXTURES / "synthetic"), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["patients"] == 14 and report["skipped"] == 0
    rows = {(r["topic"], r["indicator"]): r["patients"] for r in report["rows"]}
    # the same patients as the synthetic scenarios (same draft order): their hand-read cards, counted
    expected: Counter[tuple[str, str]] = Counter()
    critical = 0
    for path in (FIXTURES / "scenarios").glob("synthetic-*.json"):
        cards = json.loads(path.read_text())["expect"]["cards"]
        expected.update(cards.items())
        critical += "critical" in cards.values()
    assert rows == dict(expected)
    assert rows[("pregnancy", "critical")] == 1
    assert report["with_critical_card"] == critical
    assert any("898306f8" in line for s in report["samples"]["pregnancy"] for line in s["evidence"])
    text = cds("population", str(FIXTURES / "synthetic"))
    assert text.returncode == 0 and "Alert burden: 14 patients" in text.stdout and "Why" in text.stdout
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(PREGNANT, mixed / "one.json")
    (mixed / "notes.json").write_text("not json")
    report = json.loads(cds("population", str(mixed), "--format", "json").stdout)
    assert report["patients"] == 1 and report["skipped"] == 1


def test_population_reads_the_committed_population_format(tmp_path: Path) -> None:
    """*.jsonl.gz, one patient a line: {"patient": id, "resources": [...]}, beside a *.json Bundle."""
    def line(bundle_file: Path) -> dict[str, object]:
        resources = [e["resource"] for e in json.loads(bundle_file.read_text())["entry"]]
        [patient] = [r for r in resources if r["resourceType"] == "Patient"]
        return {"patient": patient["id"], "resources": resources}

    pregnant = line(PREGNANT)
    healthy = {"patient": "m-1", "resources": [{"resourceType": "Patient", "id": "m-1", "gender": "male",
                                                "birthDate": "1980-01-01"}]}
    dead = {"patient": "dead-1", "resources": [{"resourceType": "Patient", "id": "dead-1", "gender": "female",
                                                "birthDate": "1990-01-01", "deceasedBoolean": True}]}
    lines = [json.dumps(pregnant), json.dumps(healthy), json.dumps(dead), "not json", json.dumps({"patient": "x"}), ""]
    folder = tmp_path / "population"
    folder.mkdir()
    with gzip.open(folder / "small.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    result = cds("population", str(folder), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["patients"], report["deceased"], report["skipped"]) == (2, 1, 2)
    rows = {(r["topic"], r["indicator"]): r["patients"] for r in report["rows"]}
    assert rows[("pregnancy", "critical")] == 1 and report["with_critical_card"] == 1
    assert [s["patient"] for s in report["samples"]["pregnancy"]] == [pregnant["patient"]]  # named by its id
    text = cds("population", str(folder), "--format", "markdown")
    assert "| `pregnancy` | critical | 1 | 50.0% |" in text.stdout
    assert "2 living patients" in text.stdout and "1 deceased" in text.stdout and "2 skipped" in text.stdout

    shutil.copy(PREGNANT, folder / "one.json")  # both formats in one folder
    assert json.loads(cds("population", str(folder), "--format", "json").stdout)["patients"] == 3
    (folder / "broken.jsonl.gz").write_bytes(b"not gzip")
    broken = json.loads(cds("population", str(folder), "--format", "json").stdout)
    assert broken["patients"] == 3 and broken["skipped"] == 3


def test_population_of_nothing_is_exit_2(tmp_path: Path) -> None:
    assert_one_line_error(cds("population", str(tmp_path / "absent")))
    (tmp_path / "x.json").write_text("{}")
    assert_one_line_error(cds("population", str(tmp_path)))


def test_population_counts_silent_rules_and_marks_them() -> None:
    result = cds("population", str(FIXTURES / "synthetic"), "--format", "markdown",
                 env={"CDS_SILENT_RULES": "pregnancy"})
    assert result.returncode == 0, result.stderr
    assert "| `pregnancy` (silent) | critical | 1 |" in result.stdout


def test_knowledge_check_validates_and_says_what_each_rule_reads(tmp_path: Path) -> None:
    result = cds("knowledge", "check")
    assert result.returncode == 0, result.stderr
    assert "knowledge OK" in result.stdout and "pregnancy" in result.stdout
    assert "Conditions [in pregnancy-conditions" in result.stdout
    broken = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", broken)
    rule = broken / "rules" / "pregnancy.yaml"
    rule.write_text(rule.read_text().replace("in: pregnancy-conditions", "in: no-such-value-set"))
    bad = cds("knowledge", "check", "--dir", str(broken))
    assert_one_line_error(bad)
    assert "no-such-value-set" in bad.stderr
