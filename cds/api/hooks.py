"""Discovery and the hook endpoint: read the request, screen it, count it, audit it, answer it."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import metrics
from ..errors import ServiceNotFound
from ..fhir.prefetch import HOOK_TEMPLATES
from ..knowledge.loader import KnowledgeBase
from ..requests import validate_request
from ..screening.hooks import SERVED_HOOKS, SERVICE_HOOKS, SERVICES
from ..screening.pipeline import Screened, Screening
from ..store import AuditWriter, IssuedCard
from .deps import BaseUrl, Client, client_claims, read_json
from .repeats import AnsweredCards
from .responses import FhirJSON
from .security import pseudonym

log = logging.getLogger("cds")

HOOK_TITLES = {"order-select": "when a mesotherapy order is selected", "order-sign": "when orders are signed",
               "patient-view": "when the chart is opened, for a planned mesotherapy",
               "appointment-book": "when a mesotherapy appointment is booked"}
LEVELS = ("info", "warning", "critical")


def discovery_document(kb: KnowledgeBase) -> dict[str, Any]:
    """One service per hook, each with its own id and the prefetch its hook needs (the legacy id is not listed)."""
    s = kb.service
    return {"services": [
        {"hook": hook, "id": sid, "title": f"{s.title} ({HOOK_TITLES[hook]})", "description": s.description,
         "usageRequirements": s.usage_requirements, "prefetch": {t.key: t.query for t in HOOK_TEMPLATES[hook]}}
        for sid, hook in SERVICES.items()
    ]}


def issued(kb: KnowledgeBase, body: dict[str, Any], cards: list[dict[str, Any]], patient: str,
           keys: list[str] | None = None, silent: bool = False) -> list[IssuedCard]:
    """The audit store's rows for the cards of one answer (or its silent cards, with no repeat keys)."""
    now = datetime.now(UTC)
    hook, instance = body["hook"], body["hookInstance"]
    out = []
    for i, c in enumerate(cards):
        topic = c["source"]["topic"]["code"]
        out.append(IssuedCard(
            uuid=c["uuid"], rule_id=topic, rule_version=kb.by_id[topic].version, indicator=c["indicator"],
            hook=hook, hook_instance=instance, patient_pseudonym=patient, issued_at=now,
            suggestion_uuids=[s["uuid"] for s in c.get("suggestions", [])],
            repeat_key=keys[i] if keys else None, silent=silent))
    return out


class HookEndpoint:
    """The hook endpoint, a plain Starlette route: FastAPI's parameter solving costs more than the work.

    Built once at start-up with the screening and the metrics' children it counts into.
    """

    def __init__(self, kb: KnowledgeBase, screening: Screening, settings: Any, patient_key: bytes,
                 base_url: BaseUrl, memory: AnsweredCards | None) -> None:
        self.kb = kb
        self.screening = screening
        self.patient_key = patient_key
        self.base_url = base_url
        self.memory = memory
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.http_body_timeout_s
        self.latency = {hook: metrics.REQUEST_LATENCY.labels(hook=hook) for hook in SERVED_HOOKS}
        self.card_counters = {(rule.id, level): metrics.CARDS.labels(topic=rule.id, indicator=level)
                              for rule in kb.rules for level in LEVELS}
        self.silent_counters = {(rule.id, level): metrics.SILENT_CARDS.labels(topic=rule.id, indicator=level)
                                for rule in kb.rules if rule.id in kb.silent for level in LEVELS}
        self.prefetch_counters = {o: metrics.PREFETCH.labels(outcome=o) for o in ("prefetch", "fetched", "unavailable")}

    async def handle(self, request: Request) -> Response:
        await client_claims(request)
        service_id = request.path_params["service_id"]
        served = SERVICE_HOOKS.get(service_id)
        if served is None:
            raise ServiceNotFound(f"no CDS service with id {service_id!r}")
        started = time.perf_counter()
        body = validate_request(await read_json(request, self.max_body_bytes, self.body_timeout_s), served)
        patient = pseudonym(body["context"]["patientId"], self.patient_key)
        result = await self.screening.screen(body, request.app.state.fhir_http, self.base_url(request), patient)
        self._count_gathered(result)
        if result.refused is not None:
            log.warning("hook refused: %s", result.refused.message, extra={"hookInstance": body["hookInstance"],
                                                                            "hook": body["hook"], "status": 412})
            self.latency[body["hook"]].observe(time.perf_counter() - started)
            raise result.refused
        elapsed = time.perf_counter() - started
        self.latency[body["hook"]].observe(elapsed)
        cards, keys, silent = result.cards, result.keys, result.silent
        if cards and self.memory is not None:  # answered with feedback at an earlier hook: not shown again
            cards, keys = await self.memory.without_answered(request.app.state.store, body["hook"], cards, keys)
        for c in cards:
            self.card_counters[(c["source"]["topic"]["code"], c["indicator"])].inc()
        audit: AuditWriter = request.app.state.audit
        if cards:  # queued for the audit store; the answer never waits for the database
            audit.submit(issued(self.kb, body, cards, patient, keys))
        if silent:  # silent mode: recorded and counted, not returned
            for c in silent:
                self.silent_counters[(c["source"]["topic"]["code"], c["indicator"])].inc()
            audit.submit(issued(self.kb, body, silent, patient, silent=True))
        # One line per hook call at DEBUG: at INFO it cost a large share of a typical call (bench/README.md); every
        # card shown is in the audit store and every call in the metrics. INFO keeps what needs attention.
        log.debug("hook answered", extra={"hookInstance": body["hookInstance"], "hook": body["hook"],
                                          "patient": patient, "cards": len(cards), "silent": len(silent),
                                          "ms": round(elapsed * 1000, 1)})
        return FhirJSON({"cards": cards})  # render.card never emits null or empty values (tests check every response)

    def _count_gathered(self, result: Screened) -> None:
        for source, n in (("prefetch", result.prefetched), ("fetched", result.fetched),
                          ("unavailable", result.unavailable)):
            if n:
                self.prefetch_counters[source].inc(n)
        for kind in result.fhir_errors:
            metrics.FHIR_ERRORS.labels(kind=kind).inc()

    @property
    def paths(self) -> dict[str, dict[str, str]]:
        """The hook paths (with and without the trailing slash) and their path parameters, for the fast path."""
        return {f"/cds-services/{sid}{slash}": {"service_id": sid} for sid in SERVICE_HOOKS for slash in ("", "/")}


def add_routes(app: FastAPI, kb: KnowledgeBase, endpoint: HookEndpoint) -> None:
    discovery = discovery_document(kb)

    @app.get("/cds-services")
    @app.get("/cds-services/", include_in_schema=False)  # answered, not redirected: EHRs may not follow a 307
    async def discover(claims: Client) -> Response:
        return FhirJSON(discovery)

    app.add_route("/cds-services/{service_id}", endpoint.handle, methods=["POST"])
    app.add_route("/cds-services/{service_id}/", endpoint.handle, methods=["POST"])
