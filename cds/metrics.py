"""Prometheus metrics, in a registry of this module's own (not the process-wide default).

Metrics are created once, at import, so building the app repeatedly (tests) never registers a name twice.
Label values are bounded sets (hook ids, rule topics, indicators, fixed outcome/kind words): never put a
patient, user or card id in a label.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus (2.x, 3.x) parses

# no `*_created` series next to every counter and histogram in the text format (prometheus_client leaves this
# function unannotated)
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# 5 ms .. 2 s, denser around the 0.8 s service deadline
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 2.0)

PREFETCH_OUTCOMES = ("prefetch", "fetched", "unavailable")
FHIR_ERROR_KINDS = ("timeout", "http_error", "unreachable", "foreign_link", "too_large")
FEEDBACK_OUTCOMES = ("accepted", "overridden")
STORE_OPERATIONS = ("open", "ping", "record_cards", "record_feedback", "summary", "claim_jti", "prune", "answered",
                    "record_suppressed")

REQUEST_LATENCY = Histogram(
    "cds_request_duration_seconds", "Time to answer a CDS Hooks service request, by hook.",
    ["hook"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
CARDS = Counter(
    "cds_cards_total", "Cards returned, by rule topic and indicator.",
    ["topic", "indicator"], registry=REGISTRY)
SILENT_CARDS = Counter(
    "cds_silent_cards_total", "Cards computed and recorded but not returned (rules in silent mode), by rule topic "
    "and indicator.", ["topic", "indicator"], registry=REGISTRY)
PREFETCH = Counter(
    "cds_prefetch_total",
    "Data needed for a request, by source: prefetch (sent by the client), fetched (from the FHIR server), "
    "unavailable (neither).",
    ["outcome"], registry=REGISTRY)
FHIR_ERRORS = Counter(
    "cds_fhir_errors_total",
    "Failed FHIR reads, by kind: timeout, http_error, unreachable, foreign_link, too_large (bytes or entries).",
    ["kind"], registry=REGISTRY)
FEEDBACK = Counter(
    "cds_feedback_total", "Feedback entries received, by outcome.", ["outcome"], registry=REGISTRY)
SUPPRESSED = Counter(
    "cds_cards_suppressed_total",
    "Cards not shown again: answered with feedback for the same patient, order or appointment, and evidence.",
    ["topic"], registry=REGISTRY)
STORE_ERRORS = Counter(
    "cds_store_errors_total", "Audit store operations that failed (database unreachable or erroring).",
    ["operation"], registry=REGISTRY)
AUDIT_BACKLOG = Gauge(
    "cds_audit_backlog", "Issued cards (kind=cards) and feedback entries (kind=feedback) not yet in the audit "
    "store: kept in memory and in the local spool file while the store is down.", ["kind"], registry=REGISTRY)
AUDIT_DROPPED = Counter(
    "cds_audit_dropped_total", "Issued cards or feedback entries given up: the backlog was full, or the store "
    "refused them for a reason other than an outage.", registry=REGISTRY)

# Export the known label sets at zero, so dashboards and rate() see the series before the first event.
for _outcome in PREFETCH_OUTCOMES:
    PREFETCH.labels(outcome=_outcome)
for _kind in FHIR_ERROR_KINDS:
    FHIR_ERRORS.labels(kind=_kind)
for _outcome in FEEDBACK_OUTCOMES:
    FEEDBACK.labels(outcome=_outcome)
for _kind in ("cards", "feedback"):
    AUDIT_BACKLOG.labels(kind=_kind)
for _operation in STORE_OPERATIONS:
    STORE_ERRORS.labels(operation=_operation)


def render_latest(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its Content-Type, for the `/metrics` endpoint.

    Without `accept`: the Prometheus text format 0.0.4. Pass the request's Accept header to let a scraper that
    asks for OpenMetrics get it (Prometheus 3 does); anything else gets the text format.
    """
    if accept:
        encoder, content_type = choose_encoder(accept)
        return encoder(REGISTRY), content_type
    return generate_latest(REGISTRY), CONTENT_TYPE_TEXT
