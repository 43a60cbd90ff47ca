"""Silent mode (issue 17): cards computed and recorded but not returned carry `silent = true`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

VERSION = 5
DESCRIPTION = "issued_cards.silent"


def upgrade(conn: Connection) -> None:
    false = "false" if conn.dialect.name == "postgresql" else "0"
    conn.execute(sa.text(f"ALTER TABLE issued_cards ADD COLUMN silent BOOLEAN NOT NULL DEFAULT {false}"))
