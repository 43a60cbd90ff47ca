"""Instructions per request, counted by valgrind's callgrind: a reading that does not move with machine load.

Wall-clock and CPU-time readings on a shared 2-core machine move by ±15 % from run to run; instruction counts
are the same for the same code and inputs. For each app (the service, the floor) and record size, this runs the
app in process through ASGI (as `hotpath.py` does, no sockets) twice under callgrind, with 0 and with N
requests after the same warm-up, and prints the difference divided by N. The audit writer's thread is counted
too. Instructions are not time: interpreted Python does fewer per nanosecond than orjson's C, so the service's
time ratio to the floor is somewhat above its instruction ratio.

Run: `python bench/instructions.py [--sizes 20,200,1000] [--apps service,floor]` (needs valgrind; a few minutes).
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


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        import uvloop

        uvloop.run(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20")
    p.add_argument("--apps", default="service,floor")
    args = p.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        n = max(5, 4000 // size)  # about the same run time at every size
        for app_name in args.apps.split(","):
            per_request = (count(app_name, size, n) - count(app_name, size, 0)) / n
            say(f"{app_name:8s} {size:5d} resources: {per_request / 1000:9,.0f} k instructions per request")


if __name__ == "__main__":
    main()
