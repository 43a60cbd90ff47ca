"""Turn findings into CDS Hooks cards: summary, Markdown detail with evidence, suggestions, override reasons.

`new_uuid` is injected so tests can make card ids deterministic; nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import uuid_utils

from .knowledge import KnowledgeBase, Rule
from .orders import Order
from .record import validate_evidence
from .rules import Evidence, Finding

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|])")

INDICATOR_WORDS = {
    "critical": "Contraindication found",
    "warning": "Caution",
    "info": "For information",
}


def md(text: str) -> str:
    """Escape record text for GitHub-flavoured Markdown (short texts through a cache: memory bounded by bytes)."""
    return _md_cached(text) if len(text) <= 256 else _MD_SPECIAL.sub(r"\\\1", text)


@lru_cache(maxsize=8192)
def _md_cached(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def new_uuid7() -> str:
    """A card or suggestion id: a version-7 UUID (RFC 9562), time-ordered with a random tail.

    The audit store's primary key is the card uuid: ordered ids append at the end of its index, where random
    (version-4) ids touch a different page of it with every row, several times the cost of the write itself.
    """
    return str(uuid_utils.uuid7())


class _RuleText:
    """What a rule's cards share, built once: the detail's closing paragraphs, topic and override reasons.

    The dicts and lists here go into every card of the rule as they are; cards are serialised, never changed.
    """

    __slots__ = ("tail", "topic", "override_reasons", "link_label")

    def __init__(self, rule: Rule, kb: KnowledgeBase) -> None:
        service = kb.service
        lines = [f"**Why it matters.** {rule.rationale.strip()}", "", f"**What to do.** {rule.advice.strip()}", ""]
        if rule.extension:
            lines += [f"_Extension beyond the source articles:_ {rule.extension.strip()}", ""]
        lines.append(f"Source: {rule.source.citation} Rule `{rule.id}` version {rule.version}.")
        self.tail = "\n".join(lines)
        self.topic = {"system": service.topic_system, "code": rule.id, "display": rule.title}
        self.override_reasons = [
            {"system": service.override_reason_system, "code": code, "display": kb.override_reasons[code].display}
            for code in rule.override_reasons]
        self.link_label = f"About this check: {rule.title} (rule v{rule.version})"


def _rule_text(kb: KnowledgeBase, rule: Rule) -> _RuleText:
    texts = kb.derived.setdefault("rule_text", {})
    found = texts.get(rule.id)
    if found is None:
        found = texts[rule.id] = _RuleText(rule, kb)
    return found  # type: ignore[no-any-return]


def card(finding: Finding, orders: list[Order], kb: KnowledgeBase, base_url: str, patient_id: str,
         new_uuid: Callable[[], str] = new_uuid7) -> dict[str, Any]:
    rule = finding.rule
    text = _rule_text(kb, rule)
    summary = rule.summary.get(finding.indicator) or rule.summary[rule.indicator]  # type: ignore[call-overload, index]
    suggestions = [_remove_orders(orders, new_uuid)]
    for s in rule.suggestions:
        entry: dict[str, Any] = {"label": s.label, "uuid": new_uuid()}
        if s.create is not None:
            resource = {**s.create.resource, "subject": {"reference": f"Patient/{patient_id}"}}
            entry["actions"] = [{"type": "create", "description": s.create.description, "resource": resource}]
        suggestions.append(entry)
    return {
        "uuid": new_uuid(),
        "summary": summary,
        "indicator": finding.indicator,
        "detail": _detail(finding, orders, text.tail),
        "source": {"label": kb.service.source_label, "url": f"{base_url}/knowledge", "topic": text.topic},
        "suggestions": suggestions,
        "selectionBehavior": "at-most-one",
        "overrideReasons": text.override_reasons,
        "links": [{"label": text.link_label, "url": f"{base_url}/knowledge/{rule.id}", "type": "absolute"}],
    }


def _remove_orders(orders: list[Order], new_uuid: Callable[[], str]) -> dict[str, Any]:
    return {
        "label": "Remove the mesotherapy order",
        "uuid": new_uuid(),
        "actions": [{"type": "delete", "description": f"Remove the draft order {o.label} ({o.ref})",
                     "resourceId": o.ref} for o in orders],
    }


def _evidence_line(e: Evidence) -> str:
    parts = [f"`{md(e.ref)}`: **{md(e.what)}**"]
    if e.matched:
        parts.append(f"matched {md(e.matched)}")
    if e.status:
        parts.append(md(e.status))
    if e.when:
        parts.append(f"date {e.when.isoformat()}")
    parts.extend(md(n) for n in e.notes)
    if e.raw is not None and (problem := validate_evidence(e.raw)) is not None:
        parts.append("this record did not pass FHIR validation, so it was read as far as possible "
                     f"({md(problem[:120])})")
    return "- " + "; ".join(parts)


def _detail(finding: Finding, orders: list[Order], tail: str) -> str:
    rule = finding.rule
    order_text = ", ".join(f"**{md(o.label)}** (`{md(o.ref)}`, recognised by {o.matched.by})" for o in orders)
    lines = [f"**{INDICATOR_WORDS[finding.indicator]}: {md(rule.title)}** for {order_text}.", ""]
    lines.append("**What was found**")
    lines.extend(_evidence_line(e) for e in finding.evidence)
    lines.append("")
    for note in finding.notes:
        lines += [f"> {md(note)}", ""]
    lines.append(tail)
    return "\n".join(lines)
