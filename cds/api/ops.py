"""Operations: /healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import COMPILED, metrics
from ..knowledge.loader import KnowledgeBase
from ..screening.hooks import SERVICE_HOOKS
from .openapi import document
from .responses import FhirJSON


def add_routes(app: FastAPI, kb: KnowledgeBase) -> None:
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

