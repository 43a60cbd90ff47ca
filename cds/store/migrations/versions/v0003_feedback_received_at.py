"""When the service received each feedback entry (outcomeTimestamp is the client's claim).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
DESCRIPTION = "feedback.received_at"


def upgrade() -> None:
    op.add_column("feedback", sa.Column("received_at", sa.DateTime(timezone=True)))
    # rows from before this column: the best known receipt time is the outcome time
    op.execute("UPDATE feedback SET received_at = outcome_timestamp WHERE received_at IS NULL")


def downgrade() -> None:
    raise NotImplementedError("the audit store's migrations are forward-only: restore a backup instead")
