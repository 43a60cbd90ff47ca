"""The FastAPI application: discovery, the service and feedback endpoints, knowledge pages, operations."""

from __future__ import annotations

import asyncio
import gc
import html
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Annotated, Any

import aiohttp
import httpx
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import BUILD, COMPILED, __version__, dashboard, demo, metrics
from .audit import AuditWriter, prune_forever
from .errors import (
    CDSError,
    ConfigError,
    DataUnavailable,
    InvalidRequest,
    NotAuthenticated,
    PayloadTooLarge,
    RequestTimeout,
    ServiceNotFound,
)
from .fhirjson import set_text_limit
from .hooks import LEGACY_SERVICE, SERVED_HOOKS, SERVICE_HOOKS, SERVICES
from .knowledge import KnowledgeBase, load_knowledge
from .openapi import document
from .prefetch import HOOK_TEMPLATES
from .repeats import AnsweredCards
from .requests import parse_feedback, validate_request
from .screening import Screening
from .security import ClientVerifier, FallbackReplayCache, check_production_settings, pseudonym_key
from .settings import Settings, get_settings
from .store import Store, StoreError, UnknownCard

SERVICE_ID = LEGACY_SERVICE  # the first service id; EHRs registered against it keep calling it for order hooks
AUDIT_GRACE_S = 0.3  # feedback naming an unknown card is retried once after this: another worker may be writing it
log = logging.getLogger("cds")


class ServiceUnavailable(CDSError):
    """A dependency the request cannot be answered without (the replay cache, the audit store) is down."""

    status = 503
    issue_code = "transient"


class FhirJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def outcome_response(error: CDSError) -> Response:
    headers = ({"WWW-Authenticate": "Bearer"} if isinstance(error, NotAuthenticated) else
               {"Connection": "close"} if isinstance(error, RequestTimeout) else None)
    return FhirJSON(error.to_operation_outcome(), status_code=error.status, media_type="application/fhir+json",
                    headers=headers)


def error_response(exc: CDSError) -> Response:
    if isinstance(exc, NotAuthenticated):
        return outcome_response(NotAuthenticated("authentication required"))  # the reason stays in the log
    return outcome_response(exc)


def unexpected_response(request: Request) -> Response:
    log.exception("unexpected error", extra={"path": request.url.path})
    return outcome_response(CDSError("internal error; the event was logged"))


class CDSApp(FastAPI):
    """FastAPI, with the hook endpoint answered ahead of the middleware stack and router.

    Starlette's and FastAPI's layers cost ~70 us a request, as much as the clinical work of a typical record;
    `hook` is the same handler the router has (and uses when the fast path is off: CORS, a root path), and its
    errors become the same OperationOutcome answers as the app's exception handlers give.
    """

    hook: Callable[[Request], Awaitable[Response]] | None = None
    hook_paths: dict[str, dict[str, str]] = {}  # path -> its path_params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = self.hook_paths.get(scope["path"]) if scope["type"] == "http" else None
        if params is None or self.hook is None or scope["method"] != "POST" or scope.get("root_path"):
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await self.hook(request)
        except CDSError as exc:
            response = error_response(exc)
        except Exception:  # noqa: BLE001 - logged with its traceback; the caller gets a 500 OperationOutcome
            response = unexpected_response(request)
        await response(scope, receive, send)


HOOK_TITLES = {"order-select": "when a mesotherapy order is selected", "order-sign": "when orders are signed",
               "patient-view": "when the chart is opened, for a planned mesotherapy",
               "appointment-book": "when a mesotherapy appointment is booked"}


def discovery_document(kb: KnowledgeBase) -> dict[str, Any]:
    """One service per hook, each with its own id and the prefetch its hook needs (the legacy id is not listed)."""
    s = kb.service
    return {"services": [
        {"hook": hook, "id": sid, "title": f"{s.title} ({HOOK_TITLES[hook]})", "description": s.description,
         "usageRequirements": s.usage_requirements, "prefetch": {t.key: t.query for t in HOOK_TEMPLATES[hook]}}
        for sid, hook in SERVICES.items()
    ]}


async def client_claims(request: Request) -> dict[str, Any]:
    """CDS Hooks "Trusting CDS Clients": the EHR's JWT, verified for the exact endpoint called."""
    verifier: ClientVerifier | None = request.app.state.verifier
    if verifier is None:
        return {}
    try:
        return await verifier.verify(request.headers.get("authorization"), request.url.path)
    except NotAuthenticated as exc:
        log.warning("client JWT rejected: %s", exc.message, extra={"path": request.url.path})
        raise
    except StoreError as exc:
        log.error("JWT replay cache unavailable: %s", type(exc).__name__)
        raise ServiceUnavailable("the service cannot verify callers right now; retry later") from None

Client = Annotated[dict[str, Any], Depends(client_claims)]


def create_app(settings: Settings | None = None) -> CDSApp:
    """Build the app; raises ConfigError or KnowledgeError (the service must not start) on bad configuration."""
    settings = settings or get_settings()
    problems = check_production_settings(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    set_text_limit(settings.max_text_chars)
    kb = load_knowledge(settings.knowledge_dir, env=settings.env).with_overrides(settings.silent_rules,
                                                                                 settings.active_rules)
    if kb.silent:
        log.warning("silent mode: rules %s are computed and recorded, not shown", ", ".join(sorted(kb.silent)))
    discovery = discovery_document(kb)
    screening = Screening(kb, settings, pseudonym_key(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("screening modules: %s", BUILD)
        _warm_up()
        store = await _open_store(settings)
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=128, keepalive_timeout=30)
        async with httpx.AsyncClient(follow_redirects=False) as http, \
                aiohttp.ClientSession(connector=connector, raise_for_status=False, trust_env=False,
                                      auto_decompress=False) as fhir_http:  # fhir.py inflates, under a cap
            app.state.http = http  # JWKS fetches
            app.state.fhir_http = fhir_http
            app.state.store = store
            replay = FallbackReplayCache(store, _replay_fallback)
            app.state.verifier = ClientVerifier(settings, http, replay=replay) if settings.jwt_required else None
            app.state.audit = AuditWriter(store, max_pending=settings.audit_max_pending,
                                          spool=settings.audit_spool_path)
            app.state.audit.start()
            pruner = asyncio.create_task(prune_forever(store, settings.audit_retention_days,
                                                       settings.audit_prune_interval_s), name="audit-retention")
            gc.collect()
            gc.freeze()  # start-up objects (models, knowledge) never need scanning again
            try:
                yield
            finally:
                pruner.cancel()
                with suppress(asyncio.CancelledError):
                    await pruner
                if app.state.answered is not None:
                    await app.state.answered.close()
                await app.state.audit.close()
                await store.close()

    app = CDSApp(title="Mesotherapy contraindication CDS service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.kb = kb
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(CDSError)
    async def _cds_error(request: Request, exc: CDSError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ServiceNotFound("no such endpoint") if exc.status_code == 404 else CDSError(str(exc.detail))
        error.status = exc.status_code
        return outcome_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_response(request)

    public_base = settings.public_base_url.rstrip("/") if settings.public_base_url else None
    base_urls: dict[tuple[Any, ...], str] = {}  # without CDS_PUBLIC_BASE_URL (dev): from the Host header

    def base_url(request: Request) -> str:
        if public_base:
            return public_base
        scope = request.scope
        key = (scope["scheme"], scope.get("server"), scope.get("root_path"), request.headers.get("host"))
        found = base_urls.get(key)
        if found is None:
            if len(base_urls) >= 256:
                base_urls.clear()
            found = base_urls[key] = str(request.base_url).rstrip("/")
        return found

    @app.get("/cds-services")
    @app.get("/cds-services/", include_in_schema=False)  # answered, not redirected: EHRs may not follow a 307
    async def discover(claims: Client) -> Response:
        return FhirJSON(discovery)

    latency = {hook: metrics.REQUEST_LATENCY.labels(hook=hook) for hook in SERVED_HOOKS}
    card_counters = {(rule.id, level): metrics.CARDS.labels(topic=rule.id, indicator=level)
                     for rule in kb.rules for level in ("info", "warning", "critical")}
    silent_counters = {(rule.id, level): metrics.SILENT_CARDS.labels(topic=rule.id, indicator=level)
                       for rule in kb.rules if rule.id in kb.silent for level in ("info", "warning", "critical")}

    memory = (AnsweredCards(kb, timedelta(hours=settings.answered_card_memory_hours),
                            settings.answered_card_refresh_s) if settings.answered_card_memory_hours else None)
    app.state.answered = memory

    async def call_service(request: Request) -> Response:
        """The hook endpoint, a plain Starlette route: FastAPI's parameter solving costs more than the work."""
        await client_claims(request)
        service_id = request.path_params["service_id"]
        served = SERVICE_HOOKS.get(service_id)
        if served is None:
            raise ServiceNotFound(f"no CDS service with id {service_id!r}")
        started = time.perf_counter()
        body = validate_request(await read_json(request, settings.max_body_bytes, settings.http_body_timeout_s),
                                served)
        try:
            cards, silent, patient, keys = await screening.screen_keyed(body, request.app.state.fhir_http,
                                                                        base_url(request))
        except DataUnavailable as exc:
            log.warning("hook refused: %s", exc.message, extra={"hookInstance": body["hookInstance"],
                                                                 "hook": body["hook"], "status": 412})
            latency[body["hook"]].observe(time.perf_counter() - started)
            raise
        elapsed = time.perf_counter() - started
        latency[body["hook"]].observe(elapsed)
        if cards and memory is not None:  # answered with feedback at an earlier hook: not shown again
            cards, keys = await memory.without_answered(request.app.state.store, body["hook"], cards, keys)
        for c in cards:
            card_counters[(c["source"]["topic"]["code"], c["indicator"])].inc()
        if cards:  # queued for the audit store; the answer never waits for the database
            request.app.state.audit.submit(screening.issued(body, cards, patient, keys))
        if silent:  # silent mode: recorded and counted, not returned
            for c in silent:
                silent_counters[(c["source"]["topic"]["code"], c["indicator"])].inc()
            request.app.state.audit.submit(screening.issued(body, silent, patient, silent=True))
        log.info("hook answered", extra={"hookInstance": body["hookInstance"], "hook": body["hook"],
                                         "patient": patient, "cards": len(cards), "silent": len(silent),
                                         "ms": round(elapsed * 1000, 1)})
        return FhirJSON({"cards": cards})  # render.card never emits null or empty values (tests check every response)

    app.add_route("/cds-services/{service_id}", call_service, methods=["POST"])
    app.add_route("/cds-services/{service_id}/", call_service, methods=["POST"])
    if not settings.cors_origins:  # CORS headers come from middleware: with CORS on, the router serves hooks
        app.hook = call_service
        app.hook_paths = {f"/cds-services/{sid}{slash}": {"service_id": sid}
                          for sid in SERVICE_HOOKS for slash in ("", "/")}

    @app.post("/cds-services/{service_id}/feedback")
    @app.post("/cds-services/{service_id}/feedback/", include_in_schema=False)
    async def post_feedback(service_id: str, request: Request, claims: Client) -> Response:
        if service_id not in SERVICE_HOOKS:
            raise ServiceNotFound(f"no CDS service with id {service_id!r}")
        entries = parse_feedback(await read_json(request, settings.max_body_bytes, settings.http_body_timeout_s))
        audit: AuditWriter = request.app.state.audit
        try:
            await audit.flush()  # cards this worker issued a moment ago are stored first
            if audit.pending(entries):  # a card still waiting for the store (an outage): held until it is written
                audit.hold(entries)
                for e in entries:
                    metrics.FEEDBACK.labels(outcome=e.outcome).inc()
                return FhirJSON({"received": len(entries), "stored": 0, "held": len(entries)})
            try:
                stored = await request.app.state.store.record_feedback(entries)
            except UnknownCard:  # possibly issued by another worker whose batch is still being written
                await asyncio.sleep(AUDIT_GRACE_S)
                stored = await request.app.state.store.record_feedback(entries)
        except UnknownCard as exc:
            index = next(i for i, e in enumerate(entries) if e.card_uuid == exc.uuid)
            raise InvalidRequest(f"feedback[{index}].card {exc.uuid!r} is not a card this service issued",
                                 expression=f"feedback[{index}].card") from None
        except StoreError:
            raise ServiceUnavailable("feedback could not be stored; retry later") from None
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

    app.include_router(dashboard.router(kb, client_claims))  # /feedback/dashboard (HTML) and .csv, same queries
    if settings.demo_enabled:  # the demo EHR page: dev mode, or CDS_DEMO=true
        app.include_router(demo.router(kb, settings.demo_patients_dir))

    @app.get("/knowledge", response_class=HTMLResponse)
    async def knowledge_index(request: Request) -> HTMLResponse:
        items = "".join(f'<li><a href="{base_url(request)}/knowledge/{r.id}">{html.escape(r.title)}</a> '
                        f"(rule v{r.version}, {r.indicator}{', silent' if r.id in kb.silent else ''})</li>"
                        for r in kb.rules)
        return HTMLResponse(_page(kb.service.source_label,
                                  f"<p>{html.escape(kb.service.description)}</p><ul>{items}</ul>"))

    @app.get("/knowledge/{rule_id}", response_class=HTMLResponse)
    async def knowledge_page(rule_id: str) -> HTMLResponse:
        rule = kb.by_id.get(rule_id)
        if rule is None:
            raise ServiceNotFound(f"no rule {rule_id!r}")
        e = html.escape
        body = (f"<p>Rule <code>{e(rule.id)}</code>, version {rule.version}, status {e(kb.status(rule))}, "
                f"indicator {e(rule.indicator)}.</p>"
                + (f"<p><em>Extension beyond the source articles:</em> {e(rule.extension)}</p>" if rule.extension
                   else "")
                + f"<h2>Why it matters</h2><p>{e(rule.rationale)}</p><h2>What to do</h2><p>{e(rule.advice)}</p>"
                f"<h2>Source</h2><p>{e(rule.source.citation)}</p><blockquote>{e(rule.source.quote)}</blockquote>")
        return HTMLResponse(_page(rule.title, body))

    openapi_document = document(sorted(SERVICE_HOOKS))

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return FhirJSON(openapi_document, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return FhirJSON({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        store_ok = await request.app.state.store.ping()
        body = {"status": "ready" if store_ok else "not ready", "rules": len(kb.rules),
                "store": "ok" if store_ok else "unreachable", "build": "compiled" if COMPILED else "interpreted"}
        return FhirJSON(body, status_code=200 if store_ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        data, content_type = metrics.render_latest(request.headers.get("accept"))
        return Response(data, media_type=content_type)

    return app


def _replay_fallback(exc: Exception) -> None:
    metrics.STORE_ERRORS.labels(operation="claim_jti").inc()
    log.warning("JWT replay cache: database unavailable (%s); using this process's memory", type(exc).__name__)


async def _open_store(settings: Settings) -> Store:
    """The audit store; if the database is down at start-up the service still answers hooks."""
    try:
        return await Store.open(settings.sqlalchemy_url)
    except StoreError as exc:
        log.error("audit store unavailable at start-up (%s); cards are served, auditing retries", type(exc).__name__)
        return await Store.open(settings.sqlalchemy_url, migrate=False)


async def read_json(request: Request, limit: int, timeout_s: float = 10.0) -> Any:
    """The request body as JSON: 413 over the limit, 408 when it does not arrive in time, 400 when not JSON."""
    try:
        async with asyncio.timeout(timeout_s):
            chunks = await _read_body(request, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    if not chunks:
        raise InvalidRequest("the request body is empty; a JSON object is required")
    try:
        return orjson.loads(chunks)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks = await request.body()  # the server stops at the declared length
    else:  # chunked: count as it arrives
        buffer = bytearray()
        async for chunk in request.stream():
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks = bytes(buffer)
    return chunks


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
