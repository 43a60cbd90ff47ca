"""A tiny FHIR R4 server for the fetch workload: each read or search is answered after a fixed delay.

Raw ASGI under uvicorn (uvloop + httptools, one worker). It serves one patient's record, given as a JSON file of
prefetch key -> resources (see `workloads.record`), and answers
  GET /fhir/Patient/<id>                           -> the Patient
  GET /fhir/<Type>?patient=<id>[&code=...]         -> a searchset Bundle (Observations split by LOINC code)
after the delay configured for that query, only with `Authorization: Bearer <token>` (else 401). The answers are
serialised once at start-up, so the stub's own cost is a few tens of microseconds per request and the delay is
what the service waits for. `GET /__stats` tells how many FHIR requests came in and how many were in flight
at once (7 at a time for one hook call means its queries ran in parallel); `POST /__reset` zeroes it.

Run: `python bench/fhirstub.py --port 8099 --data record.json --token T --delays '{"conditions": 50}'`
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

BY_TYPE = {"Condition": "conditions", "AllergyIntolerance": "allergies", "MedicationRequest": "medicationRequests",
           "MedicationStatement": "medicationStatements"}
BY_LOINC = {"82810-3": "pregnancyStatus", "63895-7": "breastfeedingStatus"}
JSON_HEADERS = [(b"content-type", b"application/fhir+json")]


class Stub:
    """The ASGI app: pre-serialised answers, per-key delays, and request counters."""

    def __init__(self, data: dict[str, list[dict[str, Any]]], token: str, delays_ms: dict[str, float],
                 base: str) -> None:
        self.auth = f"Bearer {token}".encode()
        self.delays = {key: delays_ms.get(key, 0.0) / 1000 for key in data}
        self.answers = {key: orjson.dumps(_answer(key, items, base)) for key, items in data.items()}
        self.patient_id = data["patient"][0]["id"]
        self.stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "unauthorized": 0, "not_found": 0}

    def key_for(self, path: str, query: dict[str, list[str]]) -> str | None:
        parts = path.removeprefix("/fhir/").split("/")
        if parts == ["Patient", self.patient_id]:
            return "patient"
        if len(parts) != 1 or query.get("patient", [""])[0] not in (self.patient_id, f"Patient/{self.patient_id}"):
            return None
        if parts[0] == "Observation":
            code = query.get("code", [""])[0].split(",")[0].rpartition("|")[2]  # the first code names the key
            return BY_LOINC.get(code)
        return BY_TYPE.get(parts[0])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/__stats":
            return await _reply(send, 200, orjson.dumps(self.stats))
        if path == "/__reset":
            self.stats.update(requests=0, max_in_flight=0, unauthorized=0, not_found=0)
            return await _reply(send, 200, b"{}")
        if path == "/healthz":
            return await _reply(send, 200, b'{"status":"ok"}')
        stats = self.stats
        stats["requests"] += 1
        if dict(scope["headers"]).get(b"authorization") != self.auth:
            stats["unauthorized"] += 1
            return await _reply(send, 401, _outcome("security", "a valid bearer token is required"))
        key = self.key_for(path, parse_qs(scope["query_string"].decode()))
        if key is None:
            stats["not_found"] += 1
            return await _reply(send, 404, _outcome("not-found", f"no such resource or search: {path}"))
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            await asyncio.sleep(self.delays[key])
        finally:
            stats["in_flight"] -= 1
        await _reply(send, 200, self.answers[key])


def _answer(key: str, items: list[dict[str, Any]], base: str) -> dict[str, Any]:
    if key == "patient":
        return items[0]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(items),
            "link": [{"relation": "self", "url": f"{base}/{key}"}],
            "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in items]}


def _outcome(code: str, text: str) -> bytes:
    return orjson.dumps({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error", "code": code, "diagnostics": text}]})


async def _reply(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSON file: prefetch key -> resources")
    parser.add_argument("--token", required=True)
    parser.add_argument("--delays", default="{}", help='JSON: prefetch key -> delay in ms, e.g. {"conditions": 50}')
    args = parser.parse_args()
    base = f"http://{args.host}:{args.port}/fhir"
    app = Stub(json.loads(args.data.read_text()), args.token, json.loads(args.delays), base)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
