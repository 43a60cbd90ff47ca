"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams (uvloop when available).

`concurrency` keep-alive connections each send the same pre-built POST, wait for the whole response, record the
latency and send again, until the time is up (like `wrk -c N`). The request bytes are built once and the
response is parsed just enough (status line, Content-Length or chunked framing), so the generator spends far
less CPU per request than an httpx client would: on a 2-core machine it shares the CPU with the servers, and
every microsecond it spends is taken from them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    """Latencies (seconds) of the successful requests, and counts of everything else."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    cpu_s: float | None = 0.0  # the server's CPU seconds over the window, when the caller measures it
    non_2xx: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # the non-2xx statuses seen, and how often
    errors: int = 0
    first_error: str = ""

    def add(self, other: Result) -> None:
        self.latencies.extend(other.latencies)
        self.elapsed += other.elapsed
        self.cpu_s = None if self.cpu_s is None or other.cpu_s is None else self.cpu_s + other.cpu_s
        self.non_2xx += other.non_2xx
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error

    def summary(self) -> dict[str, float | int | None]:
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(p: float) -> float | None:
            return round(lat[min(n - 1, int(p * n))] * 1000, 2) if n else None

        return {"requests": n, "rps": round(n / self.elapsed, 1) if self.elapsed else 0.0,
                "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
                "max_ms": round(lat[-1] * 1000, 2) if n else None,
                "mean_ms": round(sum(lat) / n * 1000, 2) if n else None,
                "non_2xx": self.non_2xx, "non_2xx_statuses": {str(k): v for k, v in self.statuses.items()},
                "errors": self.errors,
                "server_cpu_ms_per_request": round(self.cpu_s / (n + self.non_2xx) * 1000, 3)
                if self.cpu_s and n + self.non_2xx else None,
                "server_cpu_utilisation": round(self.cpu_s / self.elapsed, 2) if self.cpu_s and self.elapsed else None}


def build_request(host: str, port: int, path: str, body: bytes, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: cds-bench\r\n{auth}"
            f"Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, keep_alive = None, False, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection" and value.strip().lower() == "close":
            keep_alive = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), keep_alive
    if length is None:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep_alive


async def _worker(host: str, port: int, request: bytes, start: float, stop: float, result: Result,
                  next_request: Callable[[], bytes] | None = None) -> None:
    reader = writer = None
    clock = time.perf_counter
    try:
        while clock() < stop:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            try:
                this = next_request() if next_request is not None else request
            except StopIteration:  # no more requests made ahead (signed tokens): counted as an error
                result.errors += 1
                result.first_error = result.first_error or "ran out of requests made ahead (signed tokens)"
                break
            sent = clock()
            writer.write(this)
            status, _, keep_alive = await read_response(reader)
            done = clock()
            if start <= done <= stop:  # like wrk: what completes inside the window counts
                if 200 <= status < 300:
                    result.latencies.append(done - sent)
                else:
                    result.non_2xx += 1
                    result.statuses[status] = result.statuses.get(status, 0) + 1
            if not keep_alive:
                writer.close()
                reader = writer = None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        result.errors += 1
        result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


async def run(host: str, port: int, path: str, body: bytes, concurrency: int, duration: float,
              ramp: float = 0.5, cpu: Callable[[], float | None] | None = None,
              next_request: Callable[[], bytes] | None = None) -> Result:
    """Drive one endpoint: `ramp` seconds to reach a steady state, then a `duration`-second window.

    Throughput and latencies are those of the requests completed inside the window; requests still in flight
    when it closes finish (so that the next run starts on an idle server) but are not counted. `cpu`, if given,
    is read at the window's edges (the server's CPU seconds), giving the server's CPU time per request.
    `next_request`, if given, makes each request's bytes (a JWT of its own); `body` is then not sent.
    """
    request = build_request(host, port, path, body)
    result = Result()
    loop = asyncio.get_running_loop()
    marks: dict[str, float | None] = {}
    if cpu is not None:
        loop.call_later(ramp, lambda: marks.__setitem__("start", cpu()))
        loop.call_later(ramp + duration, lambda: marks.__setitem__("stop", cpu()))
    start = time.perf_counter() + ramp
    stop = start + duration
    await asyncio.gather(*(_worker(host, port, request, start, stop, result, next_request) for _ in range(concurrency)))
    result.elapsed = duration
    a, b = marks.get("start"), marks.get("stop")
    result.cpu_s = b - a if a is not None and b is not None else None
    return result


async def one(host: str, port: int, path: str, body: bytes, timeout: float = 30.0,
              token: str | None = None) -> tuple[int, bytes]:
    """Send a single request (with `Authorization: Bearer <token>` when given); (status, body)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(build_request(host, port, path, body, token))
        status, payload, _ = await asyncio.wait_for(read_response(reader), timeout)
        return status, payload
    finally:
        writer.close()


def install_uvloop() -> str:
    """Use uvloop for the generator's own event loop when it is installed; the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
