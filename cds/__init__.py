"""Mesotherapy contraindication screening as a CDS Hooks 2.0 service.

Some modules may be compiled to C by mypyc (see setup.py); the build sits next to the sources, with
`compiled.json`, the SHA-256 of each source it was compiled from. Python would import a compiled module even
after its source has been edited, so this package runs every module interpreted when any source no longer has
its recorded hash, or when `CDS_INTERPRETED=1` is set: all or none, because compiled modules rely on each
other's compiled classes. `BUILD` says which one runs and why; the service logs it at start-up, and /readyz shows
`COMPILED`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent


def _source(name: str) -> Path:
    """The source of a module of this package, by its full name (cds.screening.rules -> screening/rules.py)."""
    return _HERE.joinpath(*name.split(".")[1:]).with_suffix(".py")


def _compiled_modules() -> set[str]:
    """The full names of the modules that have a compiled build here (cds.screening.rules)."""
    found: set[str] = set()
    for suffix in EXTENSION_SUFFIXES:
        for built in _HERE.rglob(f"*{suffix}"):
            name = built.name[: -len(suffix)]
            if "." not in name:  # ".so" also ends ".cpython-311-x86_64-linux-gnu.so"
                found.add(".".join((__name__, *built.parent.relative_to(_HERE).parts, name)))
    return found


def _current(name: str, recorded: dict[str, str]) -> bool:
    """Whether the compiled build of `name` was made from its source as it is now."""
    source = _source(name)
    if not source.exists():  # an install without sources: nothing else to run
        return True
    return hashlib.sha256(source.read_bytes()).hexdigest() == recorded.get(name)


class _Interpreted(MetaPathFinder):
    """Imports the given modules (full names) from their `.py` sources, ahead of the compiled build."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(fullname))


def _choose_build() -> str:
    compiled = _compiled_modules()
    if not compiled:
        return "interpreted (no compiled build)"
    try:
        recorded = json.loads((_HERE / "compiled.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    stale = sorted(name for name in compiled | set(recorded) if name not in compiled or not _current(name, recorded))
    if not stale and os.environ.get("CDS_INTERPRETED", "") in ("", "0"):
        return f"compiled ({', '.join(sorted(compiled))})"
    sys.meta_path.insert(0, _Interpreted(compiled))
    if stale:
        return f"interpreted (the compiled build is not of the current {', '.join(stale)}: `make install` rebuilds it)"
    return "interpreted (CDS_INTERPRETED is set)"


BUILD = _choose_build()
COMPILED = BUILD.startswith("compiled")
