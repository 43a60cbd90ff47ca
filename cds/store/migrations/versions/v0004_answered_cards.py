"""No repeated interruption (issue 16): which answered cards a later hook does not show again.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
DESCRIPTION = "issued_cards.repeat_key, answered_cards, suppressed_cards"

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    # sha256 over the patient's pseudonym, the rule, the orders or appointments and the evidence (no PHI)
    op.add_column("issued_cards", sa.Column("repeat_key", sa.Text))
    op.create_table(
        "answered_cards",
        sa.Column("repeat_key", sa.Text, primary_key=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_answered_cards_answered_at", "answered_cards", ["answered_at"])
    op.create_table(
        "suppressed_cards",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("rule_id", sa.Text, nullable=False),
        sa.Column("rule_version", sa.Integer, nullable=False),
        sa.Column("hook", sa.Text, nullable=False),
        sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_suppressed_cards_rule", "suppressed_cards", ["rule_id", "rule_version"])


def downgrade() -> None:
    raise NotImplementedError("the audit store's migrations are forward-only: restore a backup instead")
