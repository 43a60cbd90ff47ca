"""The app factory: configuration checks, the knowledge, the start-up and shut-down of what the routes use.

The routes live by concern (hooks.py, feedback.py, dashboard.py, demo.py, knowledge.py, ops.py); what they read
from a request in deps.py; every error becomes its OperationOutcome in responses.py. The server runs
`fastpath.with_fast_path(create_app(settings))` (cds/__main__.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import BUILD, __version__, metrics
from ..errors import CDSError, ConfigError
from ..fhir.json import set_text_limit
from ..knowledge.loader import load_knowledge
from ..knowledge.policy import ClinicalPolicy
from ..screening.pipeline import Screening
from ..settings import Settings, get_settings
from ..store import AuditWriter, Store, StoreError, prune_forever
from . import dashboard, demo, feedback, hooks, knowledge, ops
from .deps import BaseUrl, client_claims
from .repeats import AnsweredCards
from .responses import error_response
from .security import ClientVerifier, FallbackReplayCache, check_production_settings, pseudonym_key

log = logging.getLogger("cds")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; raises ConfigError or KnowledgeError (the service must not start) on bad configuration.

    Without CORS, `app.state.fast_path` holds the hook endpoint for `fastpath.with_fast_path`.
    """
    settings = settings or get_settings()
    problems = check_production_settings(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    set_text_limit(settings.max_text_chars)
    kb = load_knowledge(settings.knowledge_dir, env=settings.env).with_overrides(settings.silent_rules,
                                                                                 settings.active_rules)
    if kb.silent:
        log.warning("silent mode: rules %s are computed and recorded, not shown", ", ".join(sorted(kb.silent)))
    screening = Screening(kb, ClinicalPolicy.from_settings(settings), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("screening modules: %s", BUILD)
        _warm_up()
        store = await _open_store(settings)
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=128, keepalive_timeout=30)
        async with httpx.AsyncClient(follow_redirects=False) as http, \
                aiohttp.ClientSession(connector=connector, raise_for_status=False, trust_env=False,
                                      auto_decompress=False) as fhir_http:  # fhir/client.py inflates, under a cap
            app.state.http = http  # JWKS fetches
            app.state.fhir_http = fhir_http
            app.state.store = store
            replay = FallbackReplayCache(store, _replay_fallback)
            app.state.verifier = ClientVerifier(settings, http, replay=replay) if settings.jwt_required else None
            app.state.audit = AuditWriter(store, max_pending=settings.audit_max_pending,
                                          spool=settings.audit_spool_path)
            app.state.audit.start()
            if app.state.answered is not None:
                app.state.answered.start(store)
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

    app = FastAPI(title="Mesotherapy contraindication CDS service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.kb = kb
    app.state.base_url = BaseUrl(settings.public_base_url)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def _error(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.url.path)

    for kind in (CDSError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _error)

    memory = (AnsweredCards(kb, timedelta(hours=settings.answered_card_memory_hours),
                            settings.answered_card_refresh_s) if settings.answered_card_memory_hours else None)
    app.state.answered = memory
    endpoint = hooks.HookEndpoint(kb, screening, settings, pseudonym_key(settings), app.state.base_url, memory)
    hooks.add_routes(app, kb, endpoint)  # on the app itself, as before the split: app.routes lists them
    if not settings.cors_origins:  # CORS headers come from middleware: with CORS on, the router serves hooks
        app.state.fast_path = (endpoint.handle, endpoint.paths)
    feedback.add_routes(app, settings.max_body_bytes, settings.http_body_timeout_s)
    app.include_router(dashboard.router(kb, client_claims))  # /feedback/dashboard (HTML) and .csv, same queries
    if settings.demo_enabled:  # the demo EHR page: dev mode, or CDS_DEMO=true
        app.include_router(demo.router(kb, settings.demo_patients_dir))
    knowledge.add_routes(app, kb)
    ops.add_routes(app, kb)
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


def _warm_up() -> None:
    """Build the FHIR models once at start-up, so the first request does not pay for it."""
    from fhir.resources import get_fhir_model_class as r5
    from fhir.resources.R4B import get_fhir_model_class as r4b

    for lookup in (r4b, r5):
        for name in ("Condition", "AllergyIntolerance", "Observation", "MedicationRequest", "MedicationStatement",
                     "ServiceRequest", "Patient"):
            lookup(name).model_construct()
