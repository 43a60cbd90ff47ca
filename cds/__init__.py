"""Mesotherapy contraindication screening as a CDS Hooks 2.0 service."""

__version__ = "0.1.0"
