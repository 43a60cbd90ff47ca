"""One hook call's clinical work, from a validated request to its cards and audit rows.

`app.py` keeps the web framework's wiring (reading the request, errors, the answer); this module, compiled with
the other screening modules (setup.py), does the rest: find the mesotherapy orders, gather the patient's data
(prefetch, or the FHIR server), read it, evaluate the rules and render the cards.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .fhirjson import Coded
from .knowledge import KnowledgeBase
from .orders import draft_resources, find_mesotherapy
from .prefetch import TEMPLATES, build_record, gather
from .render import card
from .rules import evaluate
from .security import pseudonym
from .settings import Settings
from .store import IssuedCard

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
        context = body["context"]
        patient = pseudonym(context["patientId"], self.patient_key)
        drafts = draft_resources(context["draftOrders"])
        orders = find_mesotherapy(self.kb, body["hook"], drafts, context.get("selections"))
        if not orders:
            return [], [], patient
        gathered = await gather(body, self.settings, http)
        unavailable, fetched = len(gathered.unavailable), len(gathered.fetched)
        for source, n in (("prefetch", len(TEMPLATES) - unavailable - fetched), ("fetched", fetched),
                          ("unavailable", unavailable)):
            if n:
                self.prefetch_counters[source].inc(n)
        for kind in gathered.errors:
            metrics.FHIR_ERRORS.labels(kind=kind).inc()
        if gathered.unavailable:
            log.warning("FHIR data not obtained", extra={"hookInstance": body["hookInstance"],
                                                        "reasons": gathered.unavailable})  # no PHI in reasons
        record = build_record(gathered, context["patientId"], set(drafts.resources), self.relevant)
        today = datetime.now(UTC).date()
        findings = evaluate(self.kb, record, orders, today, self.settings)
        pid = record.patient.id
        if not self.silent:
            return [card(f, orders, self.kb, base, pid) for f in findings], [], patient
        quiet = [f for f in findings if f.rule.id in self.silent]
        if quiet and self.depend_on_silent:
            shown = evaluate(self.shown_kb, record, orders, today, self.settings)
        else:
            shown = [f for f in findings if f.rule.id not in self.silent]
        return ([card(f, orders, self.kb, base, pid) for f in shown],
                [card(f, orders, self.kb, base, pid) for f in quiet], patient)

    def issued(self, body: dict[str, Any], cards: list[dict[str, Any]], patient: str,
               silent: bool = False) -> list[IssuedCard]:
        """The audit store's rows for the cards of one answer (or its silent cards)."""
        now = datetime.now(UTC)
        hook, instance = body["hook"], body["hookInstance"]
        out = []
        for c in cards:
            topic = c["source"]["topic"]["code"]
            out.append(IssuedCard(
                uuid=c["uuid"], rule_id=topic, rule_version=self.kb.by_id[topic].version, indicator=c["indicator"],
                hook=hook, hook_instance=instance, patient_pseudonym=patient, issued_at=now,
                suggestion_uuids=[s["uuid"] for s in c.get("suggestions", [])], silent=silent))
        return out
