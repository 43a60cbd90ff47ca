"""Build step: compile the per-request screening modules to C with mypyc (project metadata is in pyproject.toml).

These modules do the work of every hook call in plain Python over dicts: reading the record, matching codes,
evaluating the rules, rendering the cards. Compiled, they take fewer instructions per request (bench/README.md).

A build is compiled or it is not, decided when it is built, as psf/black does:
- `CDS_COMPILE=1` (the wheel `make build` makes, which `make run`, `make bench` and the image run): every module
  below is compiled; a type error or a failed C build fails the build. There is no fallback.
- otherwise (the default, and what the editable install for development gets): pure Python, so an edit to a
  source is what the next test runs, with nothing to rebuild.
A compiled build is never made next to the sources (an editable install), where a stale extension module would
be imported instead of the edited source.
"""

import os
import sys

from setuptools import setup

COMPILED = ["cds.fhir.client", "cds.fhir.json", "cds.fhir.prefetch", "cds.knowledge.index", "cds.logs",
            "cds.screening.hooks", "cds.screening.orders", "cds.screening.pipeline", "cds.screening.record",
            "cds.screening.render", "cds.screening.rules"]


def extensions() -> list:
    if os.environ.get("CDS_COMPILE", "0") != "1":
        return []
    if any(arg in ("editable_wheel", "develop") or arg.startswith("--inplace") for arg in sys.argv):
        sys.exit("cds: CDS_COMPILE=1 builds a wheel (`make build`), never an editable install: compiled modules next "
                 "to the sources would hide every later edit")
    from mypyc.build import mypycify

    return mypycify([os.path.join(*name.split(".")) + ".py" for name in COMPILED], opt_level="3",
                    group_name="cds_native")


setup(ext_modules=extensions())
