"""The compiled build (setup.py, mypyc) and its fallback to interpreted Python (cds/__init__.py).

The rest of the suite runs whichever build `cds` chose, which after `make test` is the compiled one; the clinical
tests are run again here with the interpreted modules, which are what a machine without a C compiler runs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cds

ROOT = Path(__file__).resolve().parent.parent
# as in setup.py
COMPILED = ["cds.fhir.client", "cds.fhir.json", "cds.fhir.prefetch", "cds.knowledge.index", "cds.logs",
            "cds.screening.hooks", "cds.screening.orders", "cds.screening.pipeline", "cds.screening.record",
            "cds.screening.render", "cds.screening.rules"]
has_build = pytest.mark.skipif(not list(ROOT.glob("cds_native__mypyc*")), reason="no compiled build here")


def build_in(tree: Path, *, env: dict[str, str] | None = None) -> list[str]:
    """Import cds and its compiled modules in a fresh interpreter from `tree`: the build, then each module's file."""
    code = f"import cds, importlib; print(cds.BUILD); [print(importlib.import_module(m).__file__) " \
           f"for m in {COMPILED!r}]"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tree), **(env or {})})
    return out.stdout.splitlines()


def test_setup_compiles_the_modules_this_test_expects() -> None:
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    lists = [ast.literal_eval(node.value) for node in setup.body if isinstance(node, ast.Assign)
             and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["COMPILED"]]
    assert lists == [COMPILED]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the interpreted build is expected")
def test_the_suite_runs_the_compiled_build() -> None:
    assert cds.COMPILED, f"{cds.BUILD}; `make test` rebuilds it"
    from cds.fhir import prefetch
    from cds.screening import rules

    assert rules.__file__.endswith(".so") and prefetch.__file__.endswith(".so")


@has_build
def test_a_source_edited_after_the_build_makes_every_module_interpreted(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "cds", tmp_path / "cds", ignore=shutil.ignore_patterns("__pycache__"))
    for native in ROOT.glob("cds_native__mypyc*"):
        shutil.copy2(native, tmp_path)
    fresh = build_in(tmp_path)
    assert fresh[0].startswith("compiled") and all(f.endswith(".so") for f in fresh[1:]), fresh

    forced = build_in(tmp_path, env={"CDS_INTERPRETED": "1"})
    assert forced[0] == "interpreted (CDS_INTERPRETED is set)"
    assert all(f.endswith(".py") for f in forced[1:]), forced

    edited = tmp_path / "cds" / "screening" / "rules.py"
    edited.write_text(edited.read_text(encoding="utf-8") + "\n# edited after the build\n", encoding="utf-8")
    stale = build_in(tmp_path)
    assert stale[0].startswith("interpreted (the compiled build is not of the current cds.screening.rules"), stale[0]
    assert all(f.endswith(".py") for f in stale[1:]), stale  # all or none: compiled modules share classes


def test_the_clinical_tests_pass_with_the_interpreted_modules() -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/knowledge/test_index.py", "tests/screening", "tests/integration/test_scenarios.py"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CDS_INTERPRETED": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
