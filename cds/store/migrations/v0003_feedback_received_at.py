"""When the service received each feedback entry (outcomeTimestamp is the client's claim)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

VERSION = 3
DESCRIPTION = "feedback.received_at"


def upgrade(conn: Connection) -> None:
    column_type = sa.DateTime(timezone=True).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE feedback ADD COLUMN received_at {column_type}"))
    # rows from before this column: the best known receipt time is the outcome time
    conn.execute(sa.text("UPDATE feedback SET received_at = outcome_timestamp WHERE received_at IS NULL"))
