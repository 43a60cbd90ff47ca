"""Turn findings into CDS Hooks cards: summary, Markdown detail with evidence, suggestions, override reasons.

`new_uuid` is injected so tests can make card ids deterministic; nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import uuid_utils

from ..fhir.json import iso
from ..knowledge.loader import KnowledgeBase, Rule
from ..knowledge.schema import Indicator
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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WHY_SENTENCES = 2  # a card fits a narrow EHR side panel: the why in two sentences, the rest on the rule's page
WHY_CHARS = 220  # the second sentence is kept only while the why stays this short


def first_sentences(text: str, n: int = WHY_SENTENCES, limit: int = WHY_CHARS) -> str:
    """The first sentence, and the next ones up to `n` while the text stays within `limit` characters."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    out = sentences[0]
    for more in sentences[1:n]:
        if len(out) + 1 + len(more) > limit:
            break
        out = f"{out} {more}"
    return out


class _RuleText:
    """What a rule's cards share, built once: the why and what-to-do paragraph, source, topic, override reasons.

    The dicts and lists here go into every card of the rule as they are; cards are serialised, never changed.
    """

    __slots__ = ("advice", "source", "topic", "override_reasons", "link_label", "id", "summary", "indicator",
                 "suggestions")  # source: the card's source.label

    def __init__(self, rule: Rule, kb: KnowledgeBase) -> None:
        service = kb.service
        # The rule's fields a card reads, copied once: reading a pydantic model's attribute costs several times a
        # native one (pydantic's __getattr__ hook).
        self.id = rule.id
        self.summary: dict[Indicator, str] = dict(rule.summary)
        self.indicator: Indicator = rule.indicator
        self.suggestions: list[tuple[str, dict[str, Any] | None, str]] = [
            (s.label, s.create.resource if s.create is not None else None,
             s.create.description if s.create is not None else "") for s in rule.suggestions]
        why = first_sentences(rule.rationale)
        if rule.extension:
            why += " (Beyond the source articles: see the rule's page.)"
        self.advice = f"**Why:** {why}\n\n**What to do:** {' '.join(rule.advice.split())}"
        citation = " ".join(rule.source.citation.split())
        named = [a for a in service.sources if a.lower() in citation.lower()]  # the articles, by their names
        label = "; ".join(named) if named else citation
        self.source = label[:1].upper() + label[1:]
        self.topic = {"system": service.topic_system, "code": rule.id, "display": rule.title}
        self.override_reasons = [
            {"system": service.override_reason_system, "code": code, "display": kb.override_reasons[code].display}
            for code in rule.override_reasons]
        self.link_label = f"About this check: {rule.title} (rule v{rule.version})"


def _rule_text(kb: KnowledgeBase, rule: Rule) -> _RuleText:
    texts: dict[str, _RuleText] = kb.derived.setdefault("rule_text", {})
    found = texts.get(rule.id)
    if found is None:
        found = texts[rule.id] = _RuleText(rule, kb)
    return found


CONSULTATION = "Consultation before mesotherapy"


def card(finding: Finding, orders: list[Order], kb: KnowledgeBase, base_url: str, patient_id: str,
         new_uuid: Callable[[], str] = new_uuid7, hook: str = "order-sign") -> dict[str, Any]:
    """The card for one finding. Order hooks offer to remove the draft orders; appointment-book to remove the
    proposed appointments or book a consultation first; patient-view has no draft to change (links, reasons)."""
    text = _rule_text(kb, finding.rule)
    summary = text.summary.get(finding.indicator) or text.summary[text.indicator]
    suggestions: list[dict[str, Any]] = []
    if hook in ("order-select", "order-sign"):
        suggestions.append(_remove_orders(orders, new_uuid))
    elif hook == "appointment-book":
        suggestions.append(_remove_appointments(orders, new_uuid))
        suggestions.append(_consultation_first(patient_id, new_uuid))
    for label, create, description in text.suggestions:
        entry: dict[str, Any] = {"label": label, "uuid": new_uuid()}
        if create is not None:
            resource = {**create, "subject": {"reference": f"Patient/{patient_id}"}}
            entry["actions"] = [{"type": "create", "description": description, "resource": resource}]
        suggestions.append(entry)
    out: dict[str, Any] = {
        "uuid": new_uuid(),
        "summary": summary,
        "indicator": finding.indicator,
        "detail": _detail(finding, orders, text, hook),
        "source": {"label": text.source, "url": f"{base_url}/knowledge/{text.id}", "topic": text.topic},
    }
    if suggestions:
        out["suggestions"] = suggestions
        out["selectionBehavior"] = "at-most-one"
    out["overrideReasons"] = text.override_reasons
    out["links"] = [{"label": text.link_label, "url": f"{base_url}/knowledge/{text.id}", "type": "absolute"}]
    return out


def _remove_orders(orders: list[Order], new_uuid: Callable[[], str]) -> dict[str, Any]:
    return {
        "label": "Remove the mesotherapy order",
        "uuid": new_uuid(),
        "actions": [{"type": "delete", "description": f"Remove the draft order {o.label} ({o.ref})",
                     "resourceId": o.ref} for o in orders],
    }


def _remove_appointments(orders: list[Order], new_uuid: Callable[[], str]) -> dict[str, Any]:
    return {
        "label": "Remove the proposed mesotherapy appointment",
        "uuid": new_uuid(),
        "actions": [{"type": "delete", "description": f"Remove the proposed appointment {o.label} ({o.ref})",
                     "resourceId": o.ref} for o in orders],
    }


def _consultation_first(patient_id: str, new_uuid: Callable[[], str]) -> dict[str, Any]:
    resource = {"resourceType": "Appointment", "status": "proposed",
                "serviceType": [{"text": CONSULTATION}], "description": CONSULTATION,
                "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "needs-action"}]}
    return {"label": "Book a consultation first", "uuid": new_uuid(),
            "actions": [{"type": "create", "description": "Propose a consultation with the treating doctor first",
                         "resource": resource}]}


_WHERE = re.compile(r" in ([A-Za-z]+/[A-Za-z0-9\-.]+) \(from ([^)]*)\)")  # an ingredient's order and source: last line
_SAYS_ALLERGY = re.compile(r"allerg|intoleran|sensitiv|anaphyla", re.IGNORECASE)
_MATCHED = re.compile(r"^(code|text|answer) \((.*)\)$")
_LABELS = {"MedicationRequest": "prescription", "MedicationOrder": "prescription",
           "MedicationStatement": "on the medication list"}


def _found(e: Evidence, problem: str | None) -> str:
    """One piece of evidence in clinical words: what, its status and its date ("Pregnancy - active, confirmed,
    recorded 2026-10-02"); the record's reference and how it was matched go to the card's last line. `problem` is
    the record's FHIR validation problem, if any (`validate_evidence`)."""
    rtype = e.ref.split("/", 1)[0]
    words: list[str] = []
    if rtype in _LABELS:
        words.append(f"{e.status} {_LABELS[rtype]}".strip() if e.status else _LABELS[rtype])
    elif e.status and rtype != "Observation":
        words.append(md(e.status))
    if e.when:
        raw = e.raw or {}
        if "ended" in e.matched:
            verb = "ended"
        elif any(k.startswith("onset") for k in raw):
            verb = "since"
        else:
            verb = "recorded"
        words.append(f"{verb} {iso(e.when)}")
    words.extend(md(_WHERE.sub("", n)) for n in e.notes)
    if problem is not None:
        words.append("this record did not pass FHIR validation; read as far as possible")
    what = md(e.what)
    if rtype == "AllergyIntolerance" and not _SAYS_ALLERGY.search(e.what):
        what = f"Allergy to {what}"  # "Allergy to lidocaine", but "Peanut allergy" as recorded
    what = what[:1].upper() + what[1:]
    return f"{what} - {', '.join(words)}" if words else what


def _planned(o: Order) -> str:
    what = "appointment" if o.kind == "appointment" else "order"
    status = f"{o.status} {what}" if o.status else what
    return f"**{md(o.label)}** - {status}" + (f", {iso(o.when)}" if o.when else ", date not set")


def _refs(finding: Finding, orders: list[Order], problems: list[str | None]) -> str:
    parts = []
    for e, problem in zip(finding.evidence, problems, strict=True):
        ref = e.ref if "/" in e.ref else ""
        matched = _MATCHED.match(e.matched) if e.matched else None
        how = f"by {matched[1]}: {matched[2]}" if matched else e.matched
        if problem is not None:
            how = f"{how}; invalid: {problem[:80]}" if how else f"invalid: {problem[:80]}"
        for n in e.notes:
            for order_ref, origin in _WHERE.findall(n):
                how = f"{how}; ingredient of {order_ref} from {origin}" if how else \
                    f"ingredient of {order_ref} from {origin}"
        if ref:
            parts.append(f"{md(ref)} ({md(how)})" if how else md(ref))
    for o in orders:
        via = f" via {md(o.based_on)}" if o.based_on else ""
        parts.append(f"{md(o.ref)}{via} (by {o.matched.by})")
    return "; ".join(parts)


def _detail(finding: Finding, orders: list[Order], text: _RuleText, hook: str) -> str:
    evidence = finding.evidence
    problems = [validate_evidence(e.raw) if e.raw is not None else None for e in evidence]  # once per record
    if len(evidence) == 1:
        lines = [f"**Found:** {_found(evidence[0], problems[0])}"]
    else:
        lines = ["**Found:**", *(f"- {_found(e, p)}" for e, p in zip(evidence, problems, strict=True))]
    if hook not in ("order-select", "order-sign"):  # what is planned, and when
        planned = [_planned(o) for o in orders]
        lines += ["", f"**Planned:** {planned[0]}" if len(planned) == 1
                  else "\n".join(["**Planned:**", *(f"- {p}" for p in planned)])]
    lines.append("")
    for note in finding.notes:
        lines += [f"> {md(note)}", ""]
    lines += [text.advice, "", f"_Records: {_refs(finding, orders, problems)}._"]
    return "\n".join(lines)
