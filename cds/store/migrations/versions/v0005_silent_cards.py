"""Silent mode (issue 17): cards computed and recorded but not returned carry `silent = true`.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
DESCRIPTION = "issued_cards.silent"


def upgrade() -> None:
    op.add_column("issued_cards", sa.Column("silent", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    raise NotImplementedError("the audit store's migrations are forward-only: restore a backup instead")
