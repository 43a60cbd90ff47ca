"""The floor: the cheapest endpoint the service's own stack can offer for the same request.

A bare FastAPI app that reads the same CDS Hooks JSON body with orjson and answers one fixed small card. Served
the same way as the service (uvicorn, uvloop + httptools, one worker, access log off), it measures what
FastAPI + uvicorn + JSON parsing cost before any clinical work is done.

Run: `HOST=127.0.0.1 PORT=8090 python bench/floor.py`
"""

from __future__ import annotations

import os

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

CARD = orjson.dumps({"cards": [{
    "uuid": "6f1c1a9e-2b53-4c1e-9d0e-2a7b5c3d4e5f",
    "summary": "Contraindication found: pregnancy",
    "indicator": "critical",
    "detail": "Floor card: fixed text, no clinical reasoning.",
    "source": {"label": "Benchmark floor", "topic": {"system": "https://example.org/topics", "code": "floor"}},
}]})

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/cds-services/{service_id}")
async def call_service(service_id: str, request: Request) -> Response:
    body = orjson.loads(await request.body())
    if not isinstance(body, dict) or "context" not in body:
        return Response(b'{"error":"not a hook request"}', status_code=400, media_type="application/json")
    return Response(CARD, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def main() -> None:
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8090")),
                loop="uvloop", http="httptools", workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
