"""The JWT replay cache (`jti` claims), shared by every worker and replica."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

VERSION = 2
DESCRIPTION = "jwt replay cache"


def upgrade(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "jwt_replay", md,
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("expires_at", sa.Double, nullable=False),  # Unix time, seconds
        sa.Index("ix_jwt_replay_expires_at", "expires_at"),
    )
    md.create_all(conn)
