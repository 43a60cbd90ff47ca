"""One hook call's clinical work, from a validated request to its cards and audit rows.

`app.py` keeps the web framework's wiring (reading the request, errors, the answer); this module, compiled with
the other screening modules (setup.py), does the rest: find the mesotherapy orders, gather the patient's data
(prefetch, or the FHIR server), read it, evaluate the rules and render the cards.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from .. import metrics
from ..api.security import pseudonym
from ..fhir.json import Coded
from ..fhir.prefetch import PLANNED_TEMPLATES, TEMPLATES, Gathered, Template, build_record, gather
from ..knowledge.loader import KnowledgeBase
from ..settings import Settings
from ..store import IssuedCard
from .hooks import ORDER_HOOKS
from .orders import (
    Order,
    booked_mesotherapy,
    booking_resources,
    draft_resources,
    find_mesotherapy,
    planned_mesotherapy,
    unresolved_based_on,
)
from .render import card
from .rules import Finding, evaluate

log = logging.getLogger("cds")


class Screening:
    """The service's screening, built once at start-up with its knowledge, settings and metric children."""

    def __init__(self, kb: KnowledgeBase, settings: Settings, patient_key: bytes) -> None:
        self.kb = kb
        self.settings = settings
        self.patient_key = patient_key
        self.prefetch_counters = {o: metrics.PREFETCH.labels(outcome=o) for o in ("prefetch", "fetched", "unavailable")}
        # Silent mode: what clinicians see is what the shown rules give on their own, as if the silent ones did not
        # exist (a silent rule must not suppress a shown one); evaluated a second time only when that can differ.
        self.silent = kb.silent
        self.shown_kb = kb.without(kb.silent) if kb.silent else kb
        self.depend_on_silent = any(set(r.suppressed_by + r.excludes_evidence_of) & kb.silent for r in kb.rules
                                    if r.id not in kb.silent)

    def relevant(self, concept: Coded) -> bool:
        """Does any rule look at this concept? Records of concepts no rule reads are skipped early."""
        return bool(self.kb.index.hits(concept))

    async def screen(self, body: dict[str, Any], http: Any,
                     base: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        """The cards for a validated hook request, the silent rules' cards (recorded, not returned) and the
        patient's pseudonym (for the log and the audit)."""
        cards, silent, patient, _ = await self.screen_keyed(body, http, base)
        return cards, silent, patient

    async def screen_keyed(self, body: dict[str, Any], http: Any,
                           base: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, list[str]]:
        """`screen`, with each shown card's repeat key: the same patient, rule, orders or appointments and evidence
        give the same key at every hook, so an answered card can be recognised when it would show again."""
        context = body["context"]
        hook = body["hook"]
        patient = pseudonym(context["patientId"], self.patient_key)
        today = datetime.now(UTC).date()
        if hook in ORDER_HOOKS:
            drafts = draft_resources(context["draftOrders"])
            orders = find_mesotherapy(self.kb, hook, drafts, context.get("selections"))
            draft_ids = set(drafts.resources)
        elif hook == "appointment-book":
            booking = booking_resources(context["appointments"])
            orders = booked_mesotherapy(self.kb, booking, [])
            if len(orders) < sum(r.get("resourceType") == "Appointment" for r in booking.values()) \
                    and unresolved_based_on(booking):  # an appointment's order is elsewhere: read planned orders
                planned = await self._gather(body, http, PLANNED_TEMPLATES[hook])
                orders = booked_mesotherapy(self.kb, booking, planned.data.get("plannedOrders", []))
            draft_ids = set(booking) | {o.based_on for o in orders if o.based_on}
        else:  # patient-view: what is planned is read first; the record only when mesotherapy is planned
            planned = await self._gather(body, http, PLANNED_TEMPLATES[hook])
            if planned.unavailable:
                log.warning("planned procedures not obtained", extra={"hookInstance": body["hookInstance"],
                                                                      "reasons": planned.unavailable})
            orders = planned_mesotherapy(self.kb, planned.data.get("plannedOrders", []),
                                         planned.data.get("appointments", []), today,
                                         self.settings.planned_lookahead_days)
            draft_ids = {o.ref for o in orders} | {o.based_on for o in orders if o.based_on}
        if not orders:
            return [], [], patient, []
        gathered = await self._gather(body, http, TEMPLATES)
        if gathered.unavailable:
            log.warning("FHIR data not obtained", extra={"hookInstance": body["hookInstance"],
                                                        "reasons": gathered.unavailable})  # no PHI in reasons
        record = build_record(gathered, context["patientId"], draft_ids, self.relevant)
        findings = evaluate(self.kb, record, orders, today, self.settings)
        pid = record.patient.id
        quiet = [f for f in findings if f.rule.id in self.silent] if self.silent else []
        if quiet and self.depend_on_silent:  # a silent rule never hides a shown one: evaluate without it
            shown = evaluate(self.shown_kb, record, orders, today, self.settings)
        else:
            shown = [f for f in findings if f.rule.id not in self.silent] if self.silent else findings
        return ([card(f, orders, self.kb, base, pid, hook=hook) for f in shown],
                [card(f, orders, self.kb, base, pid, hook=hook) for f in quiet], patient,
                [repeat_key(patient, f, orders) for f in shown])

    async def _gather(self, body: dict[str, Any], http: Any, templates: tuple[Template, ...]) -> Gathered:
        gathered = await gather(body, self.settings, http, templates)
        unavailable, fetched = len(gathered.unavailable), len(gathered.fetched)
        for source, n in (("prefetch", len(templates) - unavailable - fetched), ("fetched", fetched),
                          ("unavailable", unavailable)):
            if n:
                self.prefetch_counters[source].inc(n)
        for kind in gathered.errors:
            metrics.FHIR_ERRORS.labels(kind=kind).inc()
        return gathered

    def issued(self, body: dict[str, Any], cards: list[dict[str, Any]], patient: str,
               keys: list[str] | None = None, silent: bool = False) -> list[IssuedCard]:
        """The audit store's rows for the cards of one answer (or its silent cards, with no repeat keys)."""
        now = datetime.now(UTC)
        hook, instance = body["hook"], body["hookInstance"]
        out = []
        for i, c in enumerate(cards):
            topic = c["source"]["topic"]["code"]
            out.append(IssuedCard(
                uuid=c["uuid"], rule_id=topic, rule_version=self.kb.by_id[topic].version, indicator=c["indicator"],
                hook=hook, hook_instance=instance, patient_pseudonym=patient, issued_at=now,
                suggestion_uuids=[s["uuid"] for s in c.get("suggestions", [])],
                repeat_key=keys[i] if keys else None, silent=silent))
        return out


def repeat_key(patient: str, finding: Finding, orders: list[Order]) -> str:
    """sha256 over the patient's pseudonym, the rule (id, version, indicator), the orders or appointments and every
    piece of evidence as the card tells it (record, what, status, date, notes): any change gives another key."""
    rule = finding.rule
    parts = [patient, rule.id, str(rule.version), finding.indicator, "\x1f".join(sorted(o.ref for o in orders))]
    parts += sorted("\x1f".join((e.ref, e.indicator, e.what, e.status, e.when.isoformat() if e.when else "",
                                 *e.notes)) for e in finding.evidence)
    parts += finding.notes
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()
