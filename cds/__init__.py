"""Mesotherapy contraindication screening as a CDS Hooks 2.0 service.

The per-request screening modules are compiled to C by mypyc in the wheel `make build` makes (setup.py); the
editable install used for development runs them as Python. Which one this is was decided when it was built:
`COMPILED` says it, the service logs `BUILD` at start-up and /readyz shows it.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import find_spec

__version__ = "0.1.0"


def _compiled() -> bool:
    """Whether the screening core was imported from a compiled extension module (found, not imported, here)."""
    spec = find_spec("cds.screening.rules")
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(EXTENSION_SUFFIXES))


COMPILED = _compiled()
BUILD = "compiled (mypyc)" if COMPILED else "interpreted"
