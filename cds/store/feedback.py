"""Clinician feedback on issued cards, the answered-card memory, and the review queries (summary, weekly).

Feedback is deduplicated by a unique key (`dedup_key`, a sha256 over the canonical card uuid, outcome,
outcomeTimestamp in UTC, override reason and sorted accepted suggestions) with `INSERT .. ON CONFLICT DO
NOTHING`, which is race-free on both databases. A batch naming a card never issued (or a silent one, never shown)
is refused whole, checked in the same write transaction (SQLite: under the write lock) as the insert.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from .engine import Database, UnknownCard
from .tables import answered_cards, feedback, issued_cards, suppressed_cards, utc

Outcome = Literal["accepted", "overridden"]
OUTCOMES: tuple[str, ...] = ("accepted", "overridden")

IN_CHUNK = 500  # uuids per `IN (...)` lookup


@dataclass(frozen=True)
class FeedbackEntry:
    card_uuid: str
    outcome: Outcome
    outcome_timestamp: datetime  # timezone-aware
    accepted_suggestions: list[str] = field(default_factory=list)
    override_reason_code: str | None = None
    override_reason_system: str | None = None
    user_comment: str | None = None

    def dedup_key(self) -> str:
        """Identity of a feedback entry: the same entry posted again has the same key (comments don't count)."""
        canonical = [self.card_uuid, self.outcome, utc(self.outcome_timestamp).isoformat(timespec="microseconds"),
                     self.override_reason_system or "", self.override_reason_code or "",
                     sorted(set(self.accepted_suggestions))]
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- writes

async def record_feedback(db: Database, entries: Sequence[FeedbackEntry]) -> int:
    """Persist a batch of feedback, all or nothing; returns how many entries were new.

    Raises `UnknownCard` (naming the first offending entry's card) before writing anything if any entry
    names a card uuid that was never issued. An entry already stored (same dedup key) is skipped.
    """
    if not entries:
        return 0
    received_at = datetime.now(UTC)
    rows: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.outcome not in OUTCOMES:
            raise ValueError(f"feedback outcome must be one of {OUTCOMES}, not {e.outcome!r}")
        key = e.dedup_key()
        rows.setdefault(key, {
            "card_uuid": e.card_uuid, "outcome": e.outcome,
            "accepted_suggestions": json.dumps(sorted(set(e.accepted_suggestions))),
            "override_reason_system": e.override_reason_system,
            "override_reason_code": e.override_reason_code, "user_comment": e.user_comment,
            "outcome_timestamp": utc(e.outcome_timestamp), "dedup_key": key, "received_at": received_at,
        })

    def write(conn: sa.Connection) -> int:  # the statements too are built off the event loop
        known = _existing_cards(conn, {e.card_uuid for e in entries})
        for e in entries:
            if e.card_uuid not in known:
                raise UnknownCard(e.card_uuid)
        stmt = (db.insert(feedback).on_conflict_do_nothing(index_elements=[feedback.c.dedup_key])
                .returning(feedback.c.id))
        stored = len(conn.execute(stmt, list(rows.values())).all())
        _remember_answered(db, conn, {e.card_uuid for e in entries}, received_at)
        return stored

    return await db.run_writing("record_feedback", write)


async def known_cards(db: Database, uuids: Iterable[str]) -> set[str]:
    """Which of these uuids name a stored card that feedback may answer (a silent card was never shown)."""
    wanted = set(uuids)
    return await db.run_reading("known_cards", lambda conn: _existing_cards(conn, wanted))


async def answered_since(db: Database, since: datetime) -> list[tuple[str, datetime]]:
    """Repeat keys of cards answered with feedback at or after `since`, with when (the latest answer)."""
    def read(conn: sa.Connection) -> list[tuple[str, datetime]]:
        result = conn.execute(sa.select(answered_cards.c.repeat_key, answered_cards.c.answered_at)
                              .where(answered_cards.c.answered_at >= since))
        return [(key, at) for key, at in result.all()]

    return await db.run_reading("answered", read)


async def record_suppressed(db: Database, rows: Sequence[tuple[str, int, str]], at: datetime) -> None:
    """Count cards not shown again because they were answered: (rule id, rule version, hook) each."""
    if rows:
        values = [{"rule_id": r, "rule_version": int(v), "hook": h, "suppressed_at": at} for r, v, h in rows]

        def write(conn: sa.Connection) -> None:
            conn.execute(sa.insert(suppressed_cards), values)

        await db.run_writing("record_suppressed", write)


# ----------------------------------------------------------------------------------------------------- reads

async def summary(db: Database, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
    """Per rule and version: cards issued (returned), silent (recorded, not returned), feedback accepted and
    overridden, and override reason counts; over the cards issued in [since, until) when given."""
    c, f = issued_cards, feedback
    joined = f.join(c, f.c.card_uuid == c.c.uuid)
    period = _period(since, until, db.dialect)

    def read(conn: sa.Connection) -> tuple[Any, ...]:
        issued = conn.execute(
            sa.select(c.c.rule_id, c.c.rule_version, c.c.silent, sa.func.count()).where(*period)
            .group_by(c.c.rule_id, c.c.rule_version, c.c.silent)).all()
        outcomes = conn.execute(
            sa.select(c.c.rule_id, c.c.rule_version, f.c.outcome, sa.func.count()).select_from(joined)
            .where(*period).group_by(c.c.rule_id, c.c.rule_version, f.c.outcome)).all()
        reasons = conn.execute(
            sa.select(c.c.rule_id, c.c.rule_version, f.c.override_reason_code, sa.func.count())
            .select_from(joined)
            .where(f.c.outcome == "overridden", f.c.override_reason_code.is_not(None), *period)
            .group_by(c.c.rule_id, c.c.rule_version, f.c.override_reason_code)).all()
        suppressed = conn.execute(
            sa.select(suppressed_cards.c.rule_id, suppressed_cards.c.rule_version, sa.func.count())
            .group_by(suppressed_cards.c.rule_id, suppressed_cards.c.rule_version)).all()
        return issued, outcomes, reasons, suppressed

    issued, outcomes, reasons, suppressed = await db.run_reading("summary", read)

    rules: dict[tuple[str, int], dict[str, Any]] = {}

    def entry(rule: str, version: int) -> dict[str, Any]:
        return rules.setdefault((rule, version), {"rule": rule, "version": str(version), "issued": 0, "silent": 0,
                                                  "accepted": 0, "overridden": 0, "override_reasons": {},
                                                  "suppressed": 0})

    for rule, version, silent, count in issued:
        entry(rule, version)["silent" if silent else "issued"] += int(count)
    for rule, version, outcome, count in outcomes:
        entry(rule, version)[outcome] = int(count)
    for rule, version, code, count in sorted(reasons, key=lambda r: (-r[3], r[2])):
        entry(rule, version)["override_reasons"][code] = int(count)
    for rule, version, count in suppressed:  # answered cards not shown again at a later hook
        entry(rule, version)["suppressed"] = int(count)
    return {"rules": [rules[k] for k in sorted(rules)]}


async def weekly(db: Database, since: datetime | None = None, until: datetime | None = None,
                 rule: str | None = None) -> list[dict[str, Any]]:
    """Per ISO week (Monday, UTC) of issue: cards issued, silent, accepted and overridden (one rule or all)."""
    c, f = issued_cards, feedback
    if db.dialect == "postgresql":
        day: Any = sa.cast(sa.func.timezone("UTC", c.c.issued_at), sa.Date)
    else:
        day = sa.func.date(c.c.issued_at)  # stored as UTC text
    where = [*_period(since, until, db.dialect)] + ([c.c.rule_id == rule] if rule else [])

    def read(conn: sa.Connection) -> tuple[Any, Any]:
        issued = conn.execute(
            sa.select(day, c.c.silent, sa.func.count()).where(*where).group_by(day, c.c.silent)).all()
        outcomes = conn.execute(
            sa.select(day, f.c.outcome, sa.func.count()).select_from(f.join(c, f.c.card_uuid == c.c.uuid))
            .where(*where).group_by(day, f.c.outcome)).all()
        return issued, outcomes

    issued, outcomes = await db.run_reading("summary", read)
    weeks: dict[date, dict[str, Any]] = {}

    def week(value: Any) -> dict[str, Any]:
        d = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
        monday = d - timedelta(days=d.weekday())
        return weeks.setdefault(monday, {"week": monday.isoformat(), "issued": 0, "silent": 0, "accepted": 0,
                                         "overridden": 0})

    for d, silent, count in issued:
        week(d)["silent" if silent else "issued"] += int(count)
    for d, outcome, count in outcomes:
        week(d)[outcome] += int(count)
    return [weeks[k] for k in sorted(weeks)]


# --------------------------------------------------------------------------------------------------- helpers

def _period(since: datetime | None, until: datetime | None, dialect: str) -> list[Any]:
    """Conditions on the card's issue time: since <= issued_at < until.

    SQLite keeps the time as text, with or without a fraction of a second depending on the writer, so there
    both sides are normalised by SQLite's datetime() (whole seconds) instead of compared as strings.
    """
    out = []
    column: Any = issued_cards.c.issued_at
    for bound, lower in ((since, True), (until, False)):
        if bound is None:
            continue
        value: Any = utc(bound)
        if dialect == "sqlite":
            column = sa.func.datetime(issued_cards.c.issued_at)
            value = sa.func.datetime(sa.literal(value.replace(tzinfo=None).isoformat(sep=" "), sa.Text))
        out.append(column >= value if lower else column < value)
    return out


def _existing_cards(conn: sa.Connection, uuids: Iterable[str]) -> set[str]:
    wanted = sorted(set(uuids))
    found: set[str] = set()
    for i in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[i:i + IN_CHUNK]
        result = conn.execute(sa.select(issued_cards.c.uuid).where(  # a silent card was never shown
            issued_cards.c.uuid.in_(chunk), issued_cards.c.silent.is_(sa.false())))
        found.update(result.scalars())
    return found


def _remember_answered(db: Database, conn: sa.Connection, uuids: set[str], at: datetime) -> None:
    """The repeat keys of cards just answered are remembered from `at` (a later answer renews the memory)."""
    keys: set[str] = set()
    wanted = sorted(uuids)
    for i in range(0, len(wanted), IN_CHUNK):
        result = conn.execute(sa.select(issued_cards.c.repeat_key).where(
            issued_cards.c.uuid.in_(wanted[i:i + IN_CHUNK]), issued_cards.c.repeat_key.is_not(None)))
        keys.update(result.scalars())
    if keys:
        stmt = db.insert(answered_cards)
        conn.execute(stmt.on_conflict_do_update(index_elements=[answered_cards.c.repeat_key],
                                                set_={"answered_at": stmt.excluded.answered_at}),
                     [{"repeat_key": k, "answered_at": at} for k in sorted(keys)])
