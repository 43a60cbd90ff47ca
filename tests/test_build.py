"""The build: compiled (the wheel `make build` makes with mypyc) or interpreted (the editable install), decided when
it is built (setup.py); nothing chooses at run time.

`make test` runs the whole suite on the interpreted install, then `make test-compiled` runs the clinical suite
(these tests included) on the compiled build with CDS_EXPECT_COMPILED=1.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import cds

ROOT = Path(__file__).resolve().parent.parent
# as in setup.py
COMPILED = ["cds.fhir.client", "cds.fhir.json", "cds.fhir.prefetch", "cds.knowledge.index", "cds.logs",
            "cds.screening.hooks", "cds.screening.orders", "cds.screening.pipeline", "cds.screening.record",
            "cds.screening.render", "cds.screening.rules"]
EXPECT_COMPILED = os.environ.get("CDS_EXPECT_COMPILED") == "1"


def test_setup_compiles_the_modules_this_test_expects() -> None:
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    lists = [ast.literal_eval(node.value) for node in setup.body if isinstance(node, ast.Assign)
             and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["COMPILED"]]
    assert lists == [COMPILED]


def test_every_compiled_module_exists_as_a_source() -> None:
    for name in COMPILED:
        assert ROOT.joinpath(*name.split(".")).with_suffix(".py").is_file(), name


def test_this_run_has_the_build_it_expects() -> None:
    files = [import_module(name).__file__ or "" for name in COMPILED]
    if EXPECT_COMPILED:  # make test-compiled: every module from the compiled build, none from the sources
        assert cds.COMPILED and cds.BUILD.startswith("compiled"), cds.BUILD
        assert all(f.endswith(".so") for f in files), files
        assert not any(Path(f).is_relative_to(ROOT / "cds") for f in files), files
        package = Path(cds.__file__).parent  # and no extension module left over from another build
        built = {".".join(("cds", *p.relative_to(package).parts))[: -len("".join(p.suffixes))]
                 for p in package.rglob("*.so")}
        assert built == set(COMPILED), built ^ set(COMPILED)
    else:  # the editable install: the sources themselves, so an edit is what the next test runs
        assert not cds.COMPILED and cds.BUILD == "interpreted", cds.BUILD
        assert all(Path(f).is_relative_to(ROOT / "cds") and f.endswith(".py") for f in files), files


def test_the_source_tree_holds_no_compiled_module() -> None:
    """A compiled module beside its source would be imported instead of it, edits or not."""
    assert not [p for p in (ROOT / "cds").rglob("*") if p.suffix in (".so", ".pyd")]


@pytest.mark.parametrize("command", [["build_ext", "--inplace"], ["develop"]])
def test_a_compiled_build_beside_the_sources_is_refused(command: list[str]) -> None:
    run = subprocess.run([sys.executable, "setup.py", *command], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CDS_COMPILE": "1"}, timeout=60)
    assert run.returncode != 0
    assert "never an editable install" in run.stderr
