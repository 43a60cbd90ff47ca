"""The JWT replay cache (`jti` claims), shared by every worker and replica.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
DESCRIPTION = "jwt replay cache"


def upgrade() -> None:
    op.create_table(
        "jwt_replay",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("expires_at", sa.Double, nullable=False),  # Unix time, seconds
    )
    op.create_index("ix_jwt_replay_expires_at", "jwt_replay", ["expires_at"])


def downgrade() -> None:
    raise NotImplementedError("the audit store's migrations are forward-only: restore a backup instead")
