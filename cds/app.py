"""The FastAPI application: discovery, the service endpoint, knowledge pages and health checks."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import CDSError, InvalidRequest, PayloadTooLarge, ServiceNotFound
from .hooks import SERVED_HOOKS, validate_request
from .knowledge import KnowledgeBase, load_knowledge
from .orders import draft_resources, find_mesotherapy
from .prefetch import TEMPLATES, build_record, gather
from .render import card
from .rules import evaluate
from .settings import Settings, get_settings

SERVICE_ID = "mesotherapy-contraindications"
log = logging.getLogger("cds")


def clean(value: Any) -> Any:
    """Drop None, empty strings, arrays and objects (CDS Hooks: never send them)."""
    if isinstance(value, dict):
        out = {k: c for k, v in value.items() if (c := clean(v)) not in (None, "", [], {})}
        return out
    if isinstance(value, list):
        return [c for v in value if (c := clean(v)) not in (None, "", [], {})]
    return value


class FhirJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def outcome_response(error: CDSError) -> Response:
    return FhirJSON(error.to_operation_outcome(), status_code=error.status, media_type="application/fhir+json")


def discovery_document(kb: KnowledgeBase) -> dict[str, Any]:
    prefetch = {t.key: t.query for t in TEMPLATES}
    s = kb.service
    return {"services": [
        {"hook": hook, "id": SERVICE_ID, "title": s.title, "description": s.description,
         "usageRequirements": s.usage_requirements, "prefetch": prefetch}
        for hook in SERVED_HOOKS
    ]}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    kb = load_knowledge(settings.knowledge_dir, env=settings.env)
    discovery = discovery_document(kb)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warm_up()
        async with httpx.AsyncClient(follow_redirects=False,
                                     limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)) as http:
            app.state.http = http
            yield

    app = FastAPI(title="Mesotherapy contraindication CDS service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.kb = kb

    @app.exception_handler(CDSError)
    async def _cds_error(request: Request, exc: CDSError) -> Response:
        return outcome_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ServiceNotFound("no such endpoint") if exc.status_code == 404 else CDSError(str(exc.detail))
        error.status = exc.status_code
        return outcome_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return outcome_response(CDSError("internal error; the event was logged"))

    def base_url(request: Request) -> str:
        return (settings.public_base_url or str(request.base_url)).rstrip("/")

    @app.get("/cds-services")
    async def discover() -> Response:
        return FhirJSON(discovery)

    @app.post("/cds-services/{service_id}")
    async def call_service(service_id: str, request: Request) -> Response:
        if service_id != SERVICE_ID:
            raise ServiceNotFound(f"no CDS service with id {service_id!r}")
        started = time.perf_counter()
        body = validate_request(await read_json(request, settings.max_body_bytes))
        cards = await screen(body, request.app.state.http, base_url(request))
        log.info("hook answered", extra={"hookInstance": body["hookInstance"], "hook": body["hook"],
                                         "cards": len(cards), "ms": round((time.perf_counter() - started) * 1000, 1)})
        return FhirJSON({"cards": [clean(c) for c in cards]})

    async def screen(body: dict[str, Any], http: httpx.AsyncClient, base: str) -> list[dict[str, Any]]:
        context = body["context"]
        drafts = draft_resources(context["draftOrders"])
        orders = find_mesotherapy(kb, body["hook"], drafts, context.get("selections"))
        if not orders:
            return []
        gathered = await gather(body, settings, http)
        record = build_record(gathered, context["patientId"], set(drafts))
        today = datetime.now(UTC).date()
        findings = evaluate(kb, record, orders, today, settings)
        return [card(f, orders, kb, base, record.patient.id) for f in findings]

    @app.get("/knowledge", response_class=HTMLResponse)
    async def knowledge_index(request: Request) -> HTMLResponse:
        items = "".join(f'<li><a href="{base_url(request)}/knowledge/{r.id}">{html.escape(r.title)}</a> '
                        f"(rule v{r.version}, {r.indicator})</li>" for r in kb.rules)
        return HTMLResponse(_page(kb.service.source_label, f"<p>{html.escape(kb.service.description)}</p>"
                                                           f"<ul>{items}</ul>"))

    @app.get("/knowledge/{rule_id}", response_class=HTMLResponse)
    async def knowledge_page(rule_id: str) -> HTMLResponse:
        rule = kb.by_id.get(rule_id)
        if rule is None:
            raise ServiceNotFound(f"no rule {rule_id!r}")
        e = html.escape
        body = (f"<p>Rule <code>{e(rule.id)}</code>, version {rule.version}, status {e(rule.status)}, "
                f"indicator {e(rule.indicator)}.</p>"
                + (f"<p><em>Extension beyond the source articles:</em> {e(rule.extension)}</p>" if rule.extension
                   else "")
                + f"<h2>Why it matters</h2><p>{e(rule.rationale)}</p><h2>What to do</h2><p>{e(rule.advice)}</p>"
                f"<h2>Source</h2><p>{e(rule.source.citation)}</p><blockquote>{e(rule.source.quote)}</blockquote>"
                f"<p>Seed article: <code>{e(rule.source.seed)}</code></p>")
        return HTMLResponse(_page(rule.title, body))

    @app.get("/healthz")
    async def healthz() -> Response:
        return FhirJSON({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        return FhirJSON({"status": "ready", "rules": len(kb.rules)})

    return app


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 over the limit, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is over {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks.extend(chunk)
        if len(chunks) > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes")
    if not chunks:
        raise InvalidRequest("the request body is empty; a JSON object is required")
    try:
        return orjson.loads(bytes(chunks))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _warm_up() -> None:
    """Build the FHIR models once at start-up, so the first request does not pay for it."""
    from fhir.resources import get_fhir_model_class as r5
    from fhir.resources.R4B import get_fhir_model_class as r4b

    for lookup in (r4b, r5):
        for name in ("Condition", "AllergyIntolerance", "Observation", "MedicationRequest", "MedicationStatement",
                     "ServiceRequest", "Patient"):
            lookup(name).model_construct()
