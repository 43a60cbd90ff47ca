"""Issued cards and clinician feedback (the audit trail).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None
DESCRIPTION = "issued cards and feedback"

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    # Frozen definitions (never the store's current tables): an old database goes through the same steps.
    op.create_table(
        "issued_cards",
        sa.Column("uuid", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, nullable=False),
        sa.Column("rule_version", sa.Integer, nullable=False),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("hook", sa.Text, nullable=False),
        sa.Column("hook_instance", sa.Text, nullable=False),
        sa.Column("patient_pseudonym", sa.Text),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("suggestion_uuids", sa.Text, nullable=False),  # JSON array of strings
    )
    op.create_index("ix_issued_cards_rule", "issued_cards", ["rule_id", "rule_version"])
    op.create_index("ix_issued_cards_issued_at", "issued_cards", ["issued_at"])
    op.create_table(
        "feedback",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("card_uuid", sa.Text, sa.ForeignKey("issued_cards.uuid"), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("accepted_suggestions", sa.Text, nullable=False),  # JSON array, sorted
        sa.Column("override_reason_system", sa.Text),
        sa.Column("override_reason_code", sa.Text),
        sa.Column("user_comment", sa.Text),
        sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
        # sha256 of the canonical (card, outcome, timestamp, reason, accepted suggestions): a resent entry is a no-op
        sa.Column("dedup_key", sa.String(64), nullable=False),
        sa.CheckConstraint("outcome IN ('accepted', 'overridden')", name="ck_feedback_outcome"),
        sa.UniqueConstraint("dedup_key", name="uq_feedback_dedup_key"),
    )
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])


def downgrade() -> None:
    raise NotImplementedError("the audit store's migrations are forward-only: restore a backup instead")
