"""Schema migrations for the audit store: alembic revisions (`versions/`), run programmatically when the store opens.

Revisions are numbered "0001", "0002", ... (`schema_version()` reports the number) and describe their tables
with frozen definitions (never the store's current table objects), so an old database is always brought forward
through the same steps a fresh one takes. `tables.py` holds the current schema; a test checks that upgrading to
the head revision builds exactly it (alembic's `compare_metadata` finds no difference, on SQLite and PostgreSQL).
To add a revision: `alembic -c cds/store/migrations/alembic.ini revision -m "..."` or copy the last one.

`upgrade()` applies every pending revision in one transaction, serialised against other processes and replicas:
on PostgreSQL by a transaction-level advisory lock (DDL is transactional there), on SQLite by `BEGIN IMMEDIATE`
(the store's engine begins every write transaction that way), so several workers starting at once against a
fresh database migrate it exactly once.

Databases from before alembic carry the old hand-written runner's table, `cds_schema_version` (one row per
applied version, 1 to 5, the same steps as revisions 0001 to 0005). Found without alembic's own table, its
highest version is stamped as the equivalent revision, and the upgrade continues from there. The old table is
left in place, unused, so a replica still running the old release during a rolling upgrade sees a database it
knows (migrations are additive, so older code keeps working against a newer schema). A database already at a
revision this code does not know (newer replicas migrated it first) is likewise left as it is.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("cds.store")

LEGACY_VERSION_TABLE = "cds_schema_version"  # the hand-written runner's, before alembic
# pg_advisory_xact_lock key: an arbitrary constant that fits in a bigint (the same one the old runner took)
ADVISORY_LOCK_KEY = int.from_bytes(b"cds-mig", "big")
_HERE = Path(__file__).resolve().parent

_legacy_meta = sa.MetaData()
legacy_schema_version = sa.Table(
    LEGACY_VERSION_TABLE, _legacy_meta,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = connection
    return cfg


@cache
def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def revision_id(version: int) -> str:
    return f"{version:04d}"


def _versions() -> list[int]:
    heads = script().get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the audit store's migrations must have one head, found {heads}")
    revisions = [int(r.revision) for r in script().walk_revisions()]
    return sorted(revisions)


VERSIONS: list[int] = _versions()  # 1..n, checked by a test
LATEST: int = VERSIONS[-1]


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """What alembic compares: not the old runner's version table (kept, unused: see the module docstring)."""
    return not (type_ == "table" and name == LEGACY_VERSION_TABLE)


def _legacy_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(LEGACY_VERSION_TABLE):
        return 0
    return int(conn.execute(sa.select(sa.func.max(legacy_schema_version.c.version))).scalar() or 0)


def _current(conn: Connection) -> tuple[str | None, int]:
    """(alembic's revision or None, the legacy runner's version or 0)."""
    revision = MigrationContext.configure(conn).get_current_revision()
    return revision, (_legacy_version(conn) if revision is None else 0)


def current_version_sync(conn: Connection) -> int:
    revision, legacy = _current(conn)
    if revision is None:
        return legacy
    return int(revision) if revision.isdigit() else -1


def upgrade_sync(conn: Connection, target: int | None = None) -> tuple[int, int]:
    """Apply revisions up to `target` (default: the latest); returns (version before, version after).

    `conn` must already hold the migration lock (see `upgrade`); everything runs in its transaction."""
    target = LATEST if target is None else target
    revision, legacy = _current(conn)
    before = int(revision) if revision is not None and revision.isdigit() else legacy
    known = revision is None or _known(revision)
    if legacy > LATEST or not known:
        log.warning("database schema version %s is newer than this release's %d; leaving it as it is",
                    revision or legacy, LATEST)
        return before, before
    cfg = config(conn)
    if revision is None and legacy:
        command.stamp(cfg, revision_id(legacy))  # the old runner's version N is revision 000N
        log.info("store schema: the pre-alembic version %d stamped as revision %s", legacy, revision_id(legacy))
    if before < target:
        command.upgrade(cfg, revision_id(target))
        for version in range(before + 1, target + 1):  # alembic's own INFO lines are off (cds.logs)
            applied = script().get_revision(revision_id(version))
            log.info("store schema: revision %s applied (%s)", revision_id(version),
                     (applied.doc or "").split(".")[0] if applied is not None else "")
        log.info("store schema migrated from version %d to %d", before, target)
    return before, max(before, target)


def _known(revision: str) -> bool:
    try:
        return script().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises its own errors for an unknown revision
        return False


async def upgrade(engine: AsyncEngine, target: int | None = None) -> tuple[int, int]:
    """Run pending migrations in one transaction, serialised across processes."""
    async with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (see cds.store.engine), i.e. the write lock
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        return await conn.run_sync(upgrade_sync, target)


async def current_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return await conn.run_sync(current_version_sync)
