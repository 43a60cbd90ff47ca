"""`python -m cds` refuses to start, exit 2 with the reason, on invalid knowledge or settings (as `make run` would)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, Service

CARDS = ROOT / "cards"


def test_service_refuses_to_start_on_invalid_knowledge(tmp_path: Path) -> None:
    root = tmp_path / "cards"
    shutil.copytree(CARDS, root)
    rule = root / "rules" / "cancer-history.yaml"
    data = yaml.safe_load(rule.read_text(encoding="utf-8"))
    data["when"]["condition"]["in"] = "no-such-set"  # as tests/knowledge/test_loader.py's dangling-value-set
    rule.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "cds"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CDS_ENV": "dev", "CDS_KNOWLEDGE_DIR": str(root),
                                 "PORT": "1"})
    assert result.returncode == 2
    assert "no-such-set" in result.stdout + result.stderr


def test_an_unknown_rule_in_the_silent_setting_stops_the_start(tmp_path: Path) -> None:
    svc = Service({"CDS_ENV": "dev", "CDS_SILENT_RULES": "pregnancy,no-such-rule", "CDS_DATA_DIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "cds"], cwd=ROOT, env=svc.env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "no-such-rule" in result.stderr + result.stdout
