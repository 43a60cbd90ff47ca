"""Issued cards and clinician feedback (the audit trail)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

VERSION = 1
DESCRIPTION = "issued cards and feedback"


def upgrade(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "issued_cards", md,
        sa.Column("uuid", sa.Text, primary_key=True),
        sa.Column("rule_id", sa.Text, nullable=False),
        sa.Column("rule_version", sa.Integer, nullable=False),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("hook", sa.Text, nullable=False),
        sa.Column("hook_instance", sa.Text, nullable=False),
        sa.Column("patient_pseudonym", sa.Text),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("suggestion_uuids", sa.Text, nullable=False),  # JSON array of strings
        sa.Index("ix_issued_cards_rule", "rule_id", "rule_version"),
        sa.Index("ix_issued_cards_issued_at", "issued_at"),
    )
    sa.Table(
        "feedback", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
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
        sa.Index("ix_feedback_card_uuid", "card_uuid"),
    )
    md.create_all(conn)
