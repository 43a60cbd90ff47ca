"""CDS Hooks feedback on the cards this service issued, and the summary of it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import metrics
from ..errors import InvalidRequest, ServiceNotFound, ServiceUnavailable
from ..requests import parse_feedback
from ..screening.hooks import SERVICE_HOOKS
from ..store import AuditWriter, StoreError, UnknownCard
from .deps import Client, read_json
from .responses import FhirJSON


def add_routes(app: FastAPI, max_body_bytes: int, body_timeout_s: float) -> None:

    @app.post("/cds-services/{service_id}/feedback")
    @app.post("/cds-services/{service_id}/feedback/", include_in_schema=False)
    async def post_feedback(service_id: str, request: Request, claims: Client) -> Response:
        if service_id not in SERVICE_HOOKS:
            raise ServiceNotFound(f"no CDS service with id {service_id!r}")
        entries = parse_feedback(await read_json(request, max_body_bytes, body_timeout_s))
        audit: AuditWriter = request.app.state.audit
        try:
            stored = await audit.record_feedback(entries)  # waits for its cards, whichever worker issued them
        except UnknownCard as exc:
            index = next(i for i, e in enumerate(entries) if e.card_uuid == exc.uuid)
            raise InvalidRequest(f"feedback[{index}].card {exc.uuid!r} is not a card this service issued",
                                 expression=f"feedback[{index}].card") from None
        except StoreError:
            raise ServiceUnavailable("feedback could not be stored; retry later") from None
        if stored is None:  # a card still waiting for the store (an outage): held until it is written
            for e in entries:
                metrics.FEEDBACK.labels(outcome=e.outcome).inc()
            return FhirJSON({"received": len(entries), "stored": 0, "held": len(entries)})
        for e in entries:
            metrics.FEEDBACK.labels(outcome=e.outcome).inc()
        if request.app.state.answered is not None:
            request.app.state.answered.stale()
        return FhirJSON({"received": len(entries), "stored": stored})  # already-stored entries count once

    @app.get("/feedback/summary")
    async def feedback_summary(request: Request, claims: Client) -> Response:
        try:
            await request.app.state.audit.flush()  # the cards answered a moment ago count
            summary = await request.app.state.store.summary()
        except StoreError:
            raise ServiceUnavailable("the audit store is unavailable; retry later") from None
        return FhirJSON(summary)  # not a CDS Hooks body: every rule keeps its override_reasons, even when empty

