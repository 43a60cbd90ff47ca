"""No repeated interruption (issue 16): which answered cards a later hook does not show again."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

VERSION = 4
DESCRIPTION = "issued_cards.repeat_key, answered_cards, suppressed_cards"


def upgrade(conn: Connection) -> None:
    # sha256 over the patient's pseudonym, the rule, the orders or appointments and the evidence (no PHI)
    conn.execute(sa.text("ALTER TABLE issued_cards ADD COLUMN repeat_key TEXT"))
    md = sa.MetaData()
    sa.Table(
        "answered_cards", md,
        sa.Column("repeat_key", sa.Text, primary_key=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_answered_cards_answered_at", "answered_at"),
    )
    sa.Table(
        "suppressed_cards", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("rule_id", sa.Text, nullable=False),
        sa.Column("rule_version", sa.Integer, nullable=False),
        sa.Column("hook", sa.Text, nullable=False),
        sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_suppressed_cards_rule", "rule_id", "rule_version"),
    )
    md.create_all(conn)
