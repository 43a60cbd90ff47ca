"""The `cds` command line in process (click's CliRunner): what `screen` prints and how it fails. The installed
console script, `fire` against a running service and the population runs are tests/integration/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cds.cli import main

from conftest import FIXTURES

REQUEST = FIXTURES / "requests" / "order-select-example.json"
PREGNANT = FIXTURES / "synthetic" / "synthea-pregnant.json"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "120"})
    return result.exit_code, result.stdout, result.stderr


def test_screen_a_hook_request_as_json() -> None:
    code, out, _ = run("screen", str(REQUEST), "--json")
    assert code == 0
    assert {c["source"]["topic"]["code"]: c["indicator"] for c in json.loads(out)["cards"]} == {
        "pregnancy": "critical", "allergy-history": "warning"}


def test_screen_a_patient_bundle_as_a_clinician_reads_it() -> None:
    code, out, _ = run("screen", str(PREGNANT), "--order", "mesotherapy-face")
    assert code == 0
    assert "CRITICAL" in out and "Mesotherapy contraindicated: active pregnancy" in out
    assert "Remove the mesotherapy order" in out and "\x1b[" not in out


def test_a_file_that_is_not_fhir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text("[1, 2]", encoding="utf-8")
    code, out, err = run("screen", str(path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cds: error: ")


def test_an_unknown_product_is_named(tmp_path: Path) -> None:
    code, _, err = run("screen", str(PREGNANT), "--product", "unobtainium")
    assert code == 2 and "unobtainium" in err
