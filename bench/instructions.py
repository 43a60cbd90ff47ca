"""Instructions per request, counted by valgrind's callgrind: a reading that does not move with machine load.

Wall-clock and CPU-time readings on a shared 2-core machine move by ±15 % from run to run; instruction counts
are the same for the same code and inputs. Two ways to count, for each app (the service, the floor) and record
size:

- `--http` (what `make bench` measures): the real server (`python -m cds`, `bench/floor.py`) runs under
  callgrind; after a warm-up its counters are zeroed (`callgrind_control -z`), N requests are sent over
  keep-alive connections at concurrency 16, and the counters are dumped (`callgrind_control -d`). Everything the
  server process does is counted: HTTP parsing, the event loop, the audit writer's threads. Two runs differ by
  1-2 % (the writer's batches fall differently).
- in process (the default): the app is called through ASGI (as `hotpath.py` does, no sockets) twice under
  callgrind, with 0 and with N requests after the same warm-up; the difference divided by N. Two runs agree
  within 1 %; uvicorn and the event loop's socket work are left out.

Instructions are not time: interpreted Python and the service's larger working set do fewer instructions a
nanosecond than orjson's C, so the service's time ratio to the floor is somewhat above its instruction ratio.

Run: `python bench/instructions.py [--http] [--sizes 20,200,1000] [--apps service,floor]` (needs valgrind; a
few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # `cds` as installed: the compiled build under `make bench`, else the work tree

from report import say  # noqa: E402


async def child(app_name: str, size: int, requests: int) -> None:
    import orjson
    import workloads
    from hotpath import call

    os.environ.setdefault("CDS_ENV", "dev")
    os.environ.setdefault("CDS_DATA_DIR", tempfile.mkdtemp(prefix="cds-instructions-"))
    body = orjson.dumps(workloads.hook_request(workloads.record(size)))
    if app_name == "floor":
        import floor

        app = framework = floor.app
    else:
        from cds.api.app import create_app
        from cds.api.fastpath import with_fast_path
        from cds.logs import configure_logging
        from cds.settings import get_settings

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)  # its one line per hook call, as it runs
        framework = create_app(settings)
        app = with_fast_path(framework)  # what the server runs (cds/__main__.py)
    async with framework.router.lifespan_context(framework):
        for i in range(20 + requests):  # the same 20 warm-up requests in both runs
            await call(app, body)
            if i % 16 == 0:
                await asyncio.sleep(0)  # let the audit writer run, as the event loop would between requests
        await asyncio.sleep(0.2)


def count(app_name: str, size: int, requests: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          __file__, "--child", app_name, str(size), str(requests)],
                         capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind total in:\n{out.stderr[-2000:]}")
    return int(found.group(1))


HTTP_WARMUP = 60


def count_http(app_name: str, size: int, requests: int) -> int:
    """Instructions the server process spends on `requests` requests over HTTP, after a warm-up."""
    import orjson
    import servers
    import workloads

    log_dir = Path(tempfile.mkdtemp(prefix="cds-instructions-"))
    port = servers.free_port()
    # valgrind names its gdbserver pipe after $HOST: callgrind_control must run with the server's environment
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "CDS_ENV": "dev",
           "CDS_DATA_DIR": str(log_dir / "data")}
    target = ["-m", "cds"] if app_name == "service" else [str(BENCH / "floor.py")]
    out = log_dir / "callgrind.out"
    with open(log_dir / "server.log", "wb") as log:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                                 *target], cwd=BENCH.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = servers.Server(app_name, port, proc, log_dir / "server.log")
    try:
        server.wait_healthy(300)
        body = orjson.dumps(workloads.hook_request(workloads.record(size)))
        asyncio.run(_send(port, body, HTTP_WARMUP))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], env=env, check=True, capture_output=True)
        asyncio.run(_send(port, body, requests))
        subprocess.run(["callgrind_control", "-d", "measured", str(proc.pid)], env=env, check=True,
                       capture_output=True)
    finally:
        server.stop()
    total = 0
    for dump in log_dir.glob("callgrind.out*"):  # one file per thread and dump; the dump named "measured"
        text = dump.read_text(errors="replace")
        if "measured" in text.split("\nfn=", 1)[0] and (found := re.search(r"^(?:totals|summary): (\d+)", text,
                                                                            re.M)):
            total += int(found.group(1))
    if not total:
        raise RuntimeError(f"no callgrind dump named 'measured' in {log_dir}")
    return total


async def _send(port: int, body: bytes, requests: int, concurrency: int = 16) -> None:
    from loadgen import build_request, read_response
    from run import PATH

    request = build_request("127.0.0.1", port, PATH, body)
    left = requests

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                status, _, _ = await read_response(reader)
                if status != 200:
                    raise RuntimeError(f"status {status}")
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        import uvloop

        uvloop.run(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20")
    p.add_argument("--apps", default="service,floor")
    p.add_argument("--http", action="store_true", help="count the real server over HTTP")
    args = p.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        n = max(5, 4000 // size)  # about the same run time at every size
        for app_name in args.apps.split(","):
            if args.http:
                per_request = count_http(app_name, size, n) / n
            else:
                per_request = (count(app_name, size, n) - count(app_name, size, 0)) / n
            say(f"{app_name:8s} {size:5d} resources: {per_request / 1000:9,.0f} k instructions per request"
                f"{' (HTTP)' if args.http else ''}")


if __name__ == "__main__":
    main()
