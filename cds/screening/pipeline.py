"""One hook call's clinical work, from a validated request to its cards.

Pure of the service around it: no store, metrics, security, settings or web framework. The API layer
(cds/api/hooks.py) reads the request, pseudonymises the patient, counts the metrics from what this returns and
writes the audit rows; this module, compiled with the other screening modules (setup.py), does the rest: find the
mesotherapy orders, gather the patient's data (prefetch, or the FHIR server), read it, evaluate the rules and
render the cards.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from ..errors import DataUnavailable
from ..fhir.json import Coded, iso
from ..fhir.prefetch import PLANNED_TEMPLATES, TEMPLATES, FhirAccess, Gathered, Template, gather
from ..knowledge.loader import KnowledgeBase
from ..knowledge.policy import ClinicalPolicy
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
from .record import build_record
from .render import card
from .rules import Finding, evaluate, rule_needs, rule_plans

log = logging.getLogger("cds")


class Screened:
    """What one screening gave: the cards, the silent rules' cards (recorded, not returned), each shown card's
    repeat key, and what gathering the data did (for the metrics: resources taken from the prefetch, fetched
    from the FHIR server, not obtained; the FHIR error kinds). `refused` is set, and nothing else past the
    gathering, when the Patient itself could not be obtained (412): the caller counts what was gathered, then
    raises it. A plain class, like the other per-request ones (`record.Fact`)."""

    __slots__ = ("cards", "silent", "keys", "prefetched", "fetched", "unavailable", "fhir_errors", "refused")

    def __init__(self) -> None:
        self.cards: list[dict[str, Any]] = []
        self.silent: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.prefetched = 0
        self.fetched = 0
        self.unavailable = 0
        self.fhir_errors: list[str] = []
        self.refused: DataUnavailable | None = None


class Screening:
    """The service's screening, built once at start-up with its knowledge, clinical policy and FHIR access.

    KnowledgeError when a rule uses a grammar leaf that is not described or not evaluated (`rules.rule_needs`).
    """

    def __init__(self, kb: KnowledgeBase, policy: ClinicalPolicy, fhir: FhirAccess) -> None:
        self.kb = kb
        self.policy = policy
        self.fhir = fhir
        self.index = kb.index  # read for every resource: an attribute of the (interpreted) knowledge base costs more
        rule_needs(kb)  # checks every rule's leaves now, at start-up
        rule_plans(kb)  # and compiles them for evaluation
        # Silent mode: what clinicians see is what the shown rules give on their own, as if the silent ones did not
        # exist (a silent rule must not suppress a shown one); evaluated a second time only when that can differ.
        self.silent = kb.silent
        self.shown_kb = kb.without(kb.silent) if kb.silent else kb
        rule_plans(self.shown_kb)
        self.depend_on_silent = any(set(r.suppressed_by + r.excludes_evidence_of) & kb.silent for r in kb.rules
                                    if r.id not in kb.silent)

    def relevant(self, concept: Coded) -> bool:
        """Does any rule look at this concept? Records of concepts no rule reads are skipped early."""
        return bool(self.index.hits(concept))

    async def screen(self, body: dict[str, Any], http: Any, base: str, patient: str = "") -> Screened:
        """Screen a validated hook request. `patient` is the caller's pseudonym of the patient, which the repeat
        keys are made from: the same patient, rule, orders or appointments and evidence give the same key at every
        hook, so an answered card can be recognised when it would show again."""
        out = Screened()
        context = body["context"]
        hook = body["hook"]
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
                planned = await self._gather(body, http, PLANNED_TEMPLATES[hook], out)
                orders = booked_mesotherapy(self.kb, booking, planned.data.get("plannedOrders", []))
            draft_ids = set(booking) | {o.based_on for o in orders if o.based_on}
        else:  # patient-view: what is planned is read first; the record only when mesotherapy is planned
            planned = await self._gather(body, http, PLANNED_TEMPLATES[hook], out)
            if planned.unavailable:
                log.warning("planned procedures not obtained", extra={"hookInstance": body["hookInstance"],
                                                                      "reasons": planned.unavailable})
            orders = planned_mesotherapy(self.kb, planned.data.get("plannedOrders", []),
                                         planned.data.get("appointments", []), today,
                                         self.policy.planned_lookahead_days)
            draft_ids = {o.ref for o in orders} | {o.based_on for o in orders if o.based_on}
        if not orders:
            return out
        gathered = await self._gather(body, http, TEMPLATES, out)
        if gathered.unavailable:
            log.warning("FHIR data not obtained", extra={"hookInstance": body["hookInstance"],
                                                        "reasons": gathered.unavailable})  # no PHI in reasons
        try:
            record = build_record(gathered, context["patientId"], draft_ids, self.relevant)
        except DataUnavailable as exc:
            out.refused = exc
            return out
        findings = evaluate(self.kb, record, orders, today, self.policy)
        pid = record.patient.id
        quiet = [f for f in findings if f.rule.id in self.silent] if self.silent else []
        if quiet and self.depend_on_silent:  # a silent rule never hides a shown one: evaluate without it
            shown = evaluate(self.shown_kb, record, orders, today, self.policy)
        else:
            shown = [f for f in findings if f.rule.id not in self.silent] if self.silent else findings
        out.cards = [card(f, orders, self.kb, base, pid, hook=hook) for f in shown]
        out.silent = [card(f, orders, self.kb, base, pid, hook=hook) for f in quiet]
        out.keys = [repeat_key(patient, f, orders) for f in shown]
        return out

    async def _gather(self, body: dict[str, Any], http: Any, templates: tuple[Template, ...],
                      out: Screened) -> Gathered:
        gathered = await gather(body, self.fhir, http, templates)
        unavailable, fetched = len(gathered.unavailable), len(gathered.fetched)
        out.prefetched += len(templates) - unavailable - fetched
        out.fetched += fetched
        out.unavailable += unavailable
        out.fhir_errors.extend(gathered.errors)
        return gathered


_SHA256 = hashlib.sha256()


def repeat_key(patient: str, finding: Finding, orders: list[Order]) -> str:
    """sha256 over the patient's pseudonym, the rule (id, version, indicator), the orders or appointments and every
    piece of evidence as the card tells it (record, what, status, date, notes): any change gives another key."""
    rule = finding.rule
    parts = [patient, rule.id, str(rule.version), finding.indicator, "\x1f".join(sorted(o.ref for o in orders))]
    parts += sorted("\x1f".join((e.ref, e.indicator, e.what, e.status, iso(e.when) if e.when else "",
                                 *e.notes)) for e in finding.evidence)
    parts += finding.notes
    digest = _SHA256.copy()  # a copy of a made context: hashlib.sha256() looks the algorithm up by name each time
    digest.update("\x1e".join(parts).encode())
    return digest.hexdigest()
