"""The `cds` command line (`cds = "cds.cli:main"`): see main.py."""

from .main import main

__all__ = ["main"]
