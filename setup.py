"""Build step: compile the per-request screening modules to C with mypyc (project metadata is in pyproject.toml).

These modules do the work of every hook call in plain Python over dicts: reading the record, matching codes,
evaluating the rules, rendering the cards. Compiled, they take fewer instructions per request (README,
Performance). The compiled build is optional: with `CDS_COMPILE=0`, or where compiling fails (no C compiler),
the package installs and runs as interpreted Python (so it does when mypy's type check fails), and `cds` logs at
start-up which one it runs.

Next to the compiled modules the build writes `cds/compiled.json`, the SHA-256 of each source it compiled.
`cds/__init__.py` runs the compiled modules only while every source still has that hash.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = ["cds.fhir.client", "cds.fhir.json", "cds.fhir.prefetch", "cds.knowledge.index", "cds.logs",
            "cds.screening.hooks", "cds.screening.orders", "cds.screening.pipeline", "cds.screening.record",
            "cds.screening.render", "cds.screening.rules"]
MANIFEST = "compiled.json"
SOURCES = {name: Path(*name.split(".")).with_suffix(".py") for name in COMPILED}
HASHES = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in SOURCES.items()}  # as compiled


class BuildExt(build_ext):
    """Builds the extensions, then records which sources the ones that built (or were up to date) came from.

    A module whose build failed is left out, so an older build of it that is still on disk is not trusted.
    """

    def run(self) -> None:
        self.succeeded: set[str] = set()
        super().run()
        built = {name: HASHES[name] for name in COMPILED if name in self.succeeded}
        if not any(name.endswith("__mypyc") for name in self.succeeded):
            built = {}  # the modules' shared library did not build: none of them can load
        target = Path(self.get_ext_fullpath("cds.logs")).parent / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(built, indent=1) + "\n", encoding="utf-8")

    def build_extension(self, ext) -> None:
        super().build_extension(ext)  # raises when it fails; an optional extension's failure is then skipped
        self.succeeded.add(ext.name)


def extensions() -> list:
    if os.environ.get("CDS_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    try:
        built = mypycify([str(path) for path in SOURCES.values()], opt_level="3", group_name="cds_native")
    except (Exception, SystemExit) as exc:  # mypy exits on a type error, e.g. with newer dependency stubs
        sys.stderr.write(f"cds: not compiling the screening modules ({type(exc).__name__}: {exc}; see above); "
                         "installing them interpreted\n")
        return []
    for extension in built:
        extension.optional = True  # a failed C build leaves the interpreted package, not a failed install
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
