"""The CDS Hooks feedback request, checked entry by entry so that a 400 names the entry that is wrong."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..errors import InvalidRequest
from ..store import FeedbackEntry

OUTCOMES = ("accepted", "overridden")


def _timestamp(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} is required (an RFC 3339 date-time)", expression=where)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{where} is not an RFC 3339 date-time", expression=where) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{where} needs a time zone (UTC)", expression=where)
    return parsed


def parse_feedback(body: Any) -> list[FeedbackEntry]:
    """`{"feedback": [...]}` -> entries; InvalidRequest naming the first malformed entry."""
    if not isinstance(body, dict) or not isinstance(body.get("feedback"), list) or not body["feedback"]:
        raise InvalidRequest("the body must be an object with a non-empty `feedback` array", expression="feedback")
    entries = []
    for i, item in enumerate(body["feedback"]):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", expression=where)
        card = item.get("card")
        if not isinstance(card, str) or not card:
            raise InvalidRequest(f"{where}.card is required (the card's uuid)", expression=f"{where}.card")
        outcome = item.get("outcome")
        if outcome not in OUTCOMES:
            raise InvalidRequest(f"{where}.outcome must be 'accepted' or 'overridden'", expression=f"{where}.outcome")
        accepted: list[str] = []
        if outcome == "accepted":
            raw = item.get("acceptedSuggestions")
            if not isinstance(raw, list) or not raw or not all(
                    isinstance(s, dict) and isinstance(s.get("id"), str) and s["id"] for s in raw):
                raise InvalidRequest(f"{where}.acceptedSuggestions is required for an accepted card: "
                                     "an array of {id}", expression=f"{where}.acceptedSuggestions")
            accepted = [s["id"] for s in raw]
        code = system = comment = None
        reason = item.get("overrideReason")
        if reason is not None:
            if not isinstance(reason, dict):
                raise InvalidRequest(f"{where}.overrideReason must be an object", expression=f"{where}.overrideReason")
            coding = reason.get("reason")
            if coding is not None:
                if not isinstance(coding, dict) or not isinstance(coding.get("code"), str) or not coding["code"]:
                    raise InvalidRequest(f"{where}.overrideReason.reason must be a Coding with a code",
                                         expression=f"{where}.overrideReason.reason")
                code = coding["code"]
                system = coding.get("system") if isinstance(coding.get("system"), str) else None
            if reason.get("userComment") is not None:
                if not isinstance(reason["userComment"], str):
                    raise InvalidRequest(f"{where}.overrideReason.userComment must be a string",
                                         expression=f"{where}.overrideReason.userComment")
                comment = reason["userComment"]
        entries.append(FeedbackEntry(
            card_uuid=card, outcome=outcome,
            outcome_timestamp=_timestamp(item.get("outcomeTimestamp"), f"{where}.outcomeTimestamp"),
            accepted_suggestions=accepted, override_reason_code=code, override_reason_system=system,
            user_comment=comment))
    return entries
