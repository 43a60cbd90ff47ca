"""Versioned schema migrations for the audit store, run programmatically when the store opens.

Each migration is a module `vNNNN_<name>.py` here with `VERSION`, `DESCRIPTION` and `upgrade(conn)`, where
`conn` is a synchronous SQLAlchemy `Connection` inside the runner's transaction. Migrations describe their
tables with their own frozen `MetaData` (never the store's current table objects), so an old database is
always brought forward through the same steps a fresh one takes.

The runner applies every migration newer than the highest version recorded in `cds_schema_version`, in one
transaction, serialised against other processes and replicas: on PostgreSQL by a transaction-level advisory
lock (DDL is transactional there), on SQLite by `BEGIN IMMEDIATE` (the store's engine begins every write
transaction that way), so several workers starting at once against a fresh database migrate it exactly once.
A database already newer than this code (a rolling upgrade: new replicas migrated first) is left as it is;
migrations are additive so older code keeps working against it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("cds.store")

VERSION_TABLE = "cds_schema_version"
# pg_advisory_xact_lock key: an arbitrary constant that fits in a bigint
ADVISORY_LOCK_KEY = int.from_bytes(b"cds-mig", "big")

_meta = sa.MetaData()
schema_version = sa.Table(
    VERSION_TABLE, _meta,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    upgrade: Callable[[Connection], None]


def _discover() -> list[Migration]:
    found: list[Migration] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("v"):
            continue
        module: ModuleType = importlib.import_module(f"{__name__}.{info.name}")
        found.append(Migration(module.VERSION, module.DESCRIPTION, module.upgrade))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


MIGRATIONS: list[Migration] = _discover()
LATEST: int = MIGRATIONS[-1].version


def current_version_sync(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return 0
    return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)


def upgrade_sync(conn: Connection, target: int | None = None) -> tuple[int, int]:
    """Apply migrations up to `target` (default: the latest); returns (version before, version after)."""
    target = LATEST if target is None else target
    _meta.create_all(conn, checkfirst=True)
    before = current_version_sync(conn)
    if before > LATEST:
        log.warning("database schema version %d is newer than this release's %d; leaving it as it is",
                    before, LATEST)
        return before, before
    version = before
    for migration in MIGRATIONS:
        if before < migration.version <= target:
            migration.upgrade(conn)
            conn.execute(sa.insert(schema_version).values(
                version=migration.version, description=migration.description, applied_at=datetime.now(UTC)))
            version = migration.version
            log.info("store schema migrated to version %d (%s)", version, migration.description)
    return before, version


async def upgrade(engine: AsyncEngine, target: int | None = None) -> tuple[int, int]:
    """Run pending migrations in one transaction, serialised across processes."""
    async with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (see cds.store), i.e. the write lock
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        return await conn.run_sync(upgrade_sync, target)


async def current_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return await conn.run_sync(current_version_sync)
