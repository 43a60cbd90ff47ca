"""Where the service spends its time: cProfile (or pyinstrument, if installed) around in-process calls.

The app is built in this process (dev mode) and called directly through ASGI, with no HTTP client or socket in
between, so the profile holds only the service's own work. For the fetch workload the delayed FHIR stub runs as a
subprocess, and the service's real httpx client talks to it.

Run: `python bench/hotpath.py typical` (or busy, synthea, fetch) [--requests 200] [--top 25] [--pyinstrument]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # `cds` as installed: the compiled build under `make bench`, else the work tree

import servers  # noqa: E402
import workloads  # noqa: E402
from report import say  # noqa: E402
from run import DELAY_SHARES, PATH, TOKEN  # noqa: E402


async def call(app: Any, body: bytes) -> tuple[int, bytes]:
    """One POST through the ASGI interface, as uvicorn would make it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "state": {}}
    sent = False
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def profile(name: str, requests: int, use_pyinstrument: bool, top: int) -> None:
    os.environ.setdefault("CDS_ENV", "dev")
    os.environ.setdefault("CDS_LOG_LEVEL", "WARNING")  # profile the work, not the log handler
    os.environ.setdefault("CDS_DATA_DIR", tempfile.mkdtemp(prefix="cds-profile-data-"))  # not the developer's data/
    from cds.api.app import create_app
    from cds.api.fastpath import with_fast_path
    from cds.settings import get_settings

    framework = create_app(get_settings())
    app = with_fast_path(framework)  # what the server runs (cds/__main__.py)
    stub = None
    if name == "fetch":
        log_dir = Path(tempfile.mkdtemp(prefix="cds-profile-"))
        data = log_dir / "record.json"
        data.write_bytes(orjson.dumps(workloads.record(workloads.SIZES["typical"])))
        stub = servers.start_stub(log_dir, data, TOKEN, json.dumps({k: s * 50 for k, s in DELAY_SHARES.items()}))
        stub.wait_healthy(60)
        body = orjson.dumps(workloads.hook_request(None, fhir_server=f"{stub.base_url}/fhir", token=TOKEN))
    else:
        body = orjson.dumps(workloads.hook_request(workloads.record(workloads.SIZES[name])))
    try:
        async with framework.router.lifespan_context(framework):
            status, payload = await call(app, body)
            cards = [c["source"]["topic"]["code"] for c in orjson.loads(payload).get("cards", [])]
            say(f"{name}: status {status}, cards {cards}, body {len(body):,} bytes")
            for _ in range(5):
                await call(app, body)
            if use_pyinstrument:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="enabled")
                profiler.start()
            else:
                profiler = cProfile.Profile()
                profiler.enable()
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(requests):
                await call(app, body)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            if use_pyinstrument:
                profiler.stop()
                say(profiler.output_text(unicode=True, color=False, show_all=False))
            else:
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                for key in ("tottime", "cumulative"):
                    stats.sort_stats(key).print_stats(top)
                say(out.getvalue())
            say(f"{requests} calls under the profiler: {wall / requests * 1000:.2f} ms wall, "
                  f"{cpu / requests * 1000:.2f} ms CPU per call (the profiler itself adds overhead)")
    finally:
        if stub is not None:
            stub.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=[*workloads.SIZES, "fetch"])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--pyinstrument", action="store_true", help="use pyinstrument (pip install pyinstrument)")
    args = p.parse_args()
    asyncio.run(profile(args.workload, args.requests, args.pyinstrument, args.top))


if __name__ == "__main__":
    main()
