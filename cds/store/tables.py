"""The audit store's tables, defined once: the queries use them, and a test checks that the migrations
(`cds/store/migrations/versions/`) build exactly this schema (alembic's `compare_metadata` finds no difference)."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


def utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored as timestamptz (PostgreSQL) or UTC text (SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # SQLite's rowid alias must be INTEGER

metadata = sa.MetaData()

issued_cards = sa.Table(
    "issued_cards", metadata,
    sa.Column("uuid", sa.Text, primary_key=True),
    sa.Column("rule_id", sa.Text, nullable=False),  # the rule's topic code
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("indicator", sa.String(16), nullable=False),
    sa.Column("hook", sa.Text, nullable=False),
    sa.Column("hook_instance", sa.Text, nullable=False),
    sa.Column("patient_pseudonym", sa.Text),
    sa.Column("issued_at", UTCDateTime, nullable=False),
    sa.Column("suggestion_uuids", sa.Text, nullable=False),  # JSON array of strings
    # sha256 over the patient's pseudonym, the rule, the orders or appointments and the evidence (no PHI)
    sa.Column("repeat_key", sa.Text),
    sa.Column("silent", sa.Boolean, nullable=False, server_default=sa.false()),  # recorded, not returned
    sa.Index("ix_issued_cards_rule", "rule_id", "rule_version"),
    sa.Index("ix_issued_cards_issued_at", "issued_at"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("card_uuid", sa.Text, sa.ForeignKey("issued_cards.uuid"), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("accepted_suggestions", sa.Text, nullable=False),  # JSON array, sorted
    sa.Column("override_reason_system", sa.Text),
    sa.Column("override_reason_code", sa.Text),
    sa.Column("user_comment", sa.Text),
    sa.Column("outcome_timestamp", UTCDateTime, nullable=False),  # the client's claim
    # sha256 of the canonical (card, outcome, timestamp, reason, accepted suggestions): a resent entry is a no-op
    sa.Column("dedup_key", sa.String(64), nullable=False),
    sa.Column("received_at", UTCDateTime),  # when this service received it
    sa.CheckConstraint("outcome IN ('accepted', 'overridden')", name="ck_feedback_outcome"),
    sa.UniqueConstraint("dedup_key", name="uq_feedback_dedup_key"),
    sa.Index("ix_feedback_card_uuid", "card_uuid"),
)

answered_cards = sa.Table(  # no repeated interruption (issue 16): answered cards a later hook does not show again
    "answered_cards", metadata,
    sa.Column("repeat_key", sa.Text, primary_key=True),
    sa.Column("answered_at", UTCDateTime, nullable=False),
    sa.Index("ix_answered_cards_answered_at", "answered_at"),
)

suppressed_cards = sa.Table(
    "suppressed_cards", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("rule_id", sa.Text, nullable=False),
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("hook", sa.Text, nullable=False),
    sa.Column("suppressed_at", UTCDateTime, nullable=False),
    sa.Index("ix_suppressed_cards_rule", "rule_id", "rule_version"),
)

jwt_replay = sa.Table(  # the JWT replay cache (`jti` claims), shared by every worker and replica
    "jwt_replay", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("expires_at", sa.Double, nullable=False),  # Unix time, seconds
    sa.Index("ix_jwt_replay_expires_at", "expires_at"),
)
