"""Alembic revisions of the audit store's schema, one module each (`revision` = "0001", "0002", ...)."""
