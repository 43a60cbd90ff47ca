"""The demo EHR page: see the service work without an EHR.

`GET /demo` serves a small EHR-like page (static HTML, CSS and script from `cds/static/`, no build step, no
CDN). It lists the fixture patients (or takes a pasted FHIR Bundle), shows a short summary, and lets the user
order mesotherapy or book a mesotherapy appointment; the page itself calls the service's hooks as an EHR does
(patient-view when the chart opens, order-select while choosing, order-sign on signing, appointment-book on
booking) with the patient's data as prefetch, renders the cards like an EHR's CDS panel, applies
suggestions to its draft orders and proposed appointments, posts feedback, and shows the exact request and response.

On in dev mode, off otherwise unless `CDS_DEMO=true`. Outside dev the hook and feedback endpoints still require
the EHR's JWT, which the page cannot sign: enable it only with `CDS_REQUIRE_JWT=false` on a test deployment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from ..errors import InvalidRequest, ServiceNotFound
from ..knowledge.loader import KnowledgeBase
from ..screening import bundles
from ..screening.bundles import NotFhir
from ..screening.hooks import SERVICES

# The CDS service the page calls, per hook. One place to change when discovery lists one service per hook.
HOOK_SERVICES = {hook: sid for sid, hook in SERVICES.items()}  # one id a hook

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css", "markdown.js": "text/javascript"}
MAX_BUNDLE_BYTES = 8 * 1024 * 1024


def _patients(directory: Path) -> dict[str, Path]:
    """The fixture patients: file stem -> path, for every *.json there that is a patient Bundle."""
    found: dict[str, Path] = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            found[path.stem] = path
    return found


def router(kb: KnowledgeBase, patients_dir: Path) -> APIRouter:
    api = APIRouter()
    files = _patients(patients_dir)
    cache: dict[str, dict[str, Any]] = {}

    def load(name: str) -> dict[str, Any]:
        path = files.get(name)
        if path is None:
            raise ServiceNotFound(f"no demo patient {name!r}")
        if name not in cache:
            kind, doc = bundles.classify(bundles.read_json(path), name)
            if kind != "bundle":
                raise ServiceNotFound(f"demo patient {name!r} is not a patient Bundle")
            cache[name] = doc
        return cache[name]

    def described(bundle: dict[str, Any]) -> dict[str, Any]:
        patient_id, prefetch = bundles.prefetch(bundle)
        return {"patientId": patient_id, "summary": bundles.summary(bundle), "prefetch": prefetch,
                "planned": bundles.planned(bundle)}

    @api.get("/demo", response_class=HTMLResponse, include_in_schema=False)
    @api.get("/demo/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        config = {
            "services": HOOK_SERVICES,
            "orderables": [{"code": o.code, "display": o.display} for o in kb.orderables.orderables],
            "orderableSystem": kb.orderables.system,
            "products": [{"id": i.id, "display": i.display, "detail": bundles.product_detail(kb, i.id)}
                         for i in kb.ingredients.values()],
            "draftId": bundles.DRAFT_ID,
        }
        page = (STATIC / "demo.html").read_text(encoding="utf-8")
        script = json.dumps(config).replace("</", "<\\/")
        return HTMLResponse(page.replace("{{CONFIG}}", script), headers={"Cache-Control": "no-store"})

    @api.get("/demo/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise ServiceNotFound(f"no asset {name!r}")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @api.get("/demo/api/patients", include_in_schema=False)
    async def patient_list() -> JSONResponse:
        out = []
        for name in files:
            try:
                s = bundles.summary(load(name))
            except (NotFhir, ServiceNotFound):
                continue
            out.append({"name": name, "display": s["name"], "gender": s["gender"], "birthDate": s["birthDate"]})
        return JSONResponse({"patients": out})

    @api.get("/demo/api/patients/{name}", include_in_schema=False)
    async def patient(name: str) -> JSONResponse:
        try:
            return JSONResponse(described(load(name)))
        except NotFhir as exc:
            raise InvalidRequest(str(exc)) from None

    @api.post("/demo/api/bundle", include_in_schema=False)
    async def pasted(request: Request) -> JSONResponse:
        raw = await request.body()
        if len(raw) > MAX_BUNDLE_BYTES:
            raise InvalidRequest(f"the Bundle is over {MAX_BUNDLE_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"not JSON: {exc}") from None
        try:
            kind, bundle = bundles.classify(doc, "the pasted text")
            if kind != "bundle":
                raise NotFhir("the pasted text is a hook request; paste a patient's FHIR Bundle")
            return JSONResponse(described(bundle))
        except NotFhir as exc:
            raise InvalidRequest(str(exc)) from None

    return api
