"""`make bench`: the service against the floor of its own stack, in one run, on the same requests.

Starts the service (`python -m cds`: uvicorn with uvloop + httptools, one worker, dev mode) and the floor app
(`bench/floor.py`), each as `--instances` separate processes, and, for the fetch workload, a delayed FHIR stub
(`bench/fhirstub.py`), each on a free port of 127.0.0.1. For every workload it checks one request of each, warms
every process up, then drives them alternately in slices (service, floor, service, ...; slice i on the i-th
process of each, round the instances) at a fixed concurrency with the closed-loop generator of `bench/loadgen.py`,
which runs in this process: on a small machine it shares the CPU with the servers, and the output says so. Each
side's latencies and counts are pooled over its processes: one process's speed depends on where it lands
(identical processes side by side differed by up to 8 %), so a single pair of processes decides a ratio by luck.
Prints a table per workload and a summary, writes `bench/results.json`, and exits 0 whatever the numbers are (2 only
when a server cannot start at all).

Options (or BENCH_* environment variables): --duration 10 (seconds per endpoint per workload), --warmup 2,
--concurrency 16, --slices 6, --instances 3, --workloads typical,busy,synthea,fetch,jwt,feedback,
--fhir-delay-ms 50,
--output PATH. Quick run: `python bench/run.py --duration 2 --warmup 0.5`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ehrjwt
import loadgen
import report
import servers
import workloads
from report import say

PATH = "/cds-services/mesotherapy-contraindications"
FEEDBACK_PATH = f"{PATH}/feedback"
FEEDBACK_CARDS_CALLS = 500  # hook calls to each feedback process first: its cards are what the feedback answers
TOKEN = "bench-token-3f9a7c"  # the stub's bearer token, sent by the EHR in fhirAuthorization
# the fetch workload's per-query delays, as shares of the slowest one: in series they would add up to 4x it
DELAY_SHARES = {"patient": 0.2, "conditions": 1.0, "allergies": 0.6, "pregnancyStatus": 0.4,
                "breastfeedingStatus": 0.4, "medicationRequests": 0.8, "medicationStatements": 0.6}


def options() -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "10")))
    p.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "2")))
    p.add_argument("--concurrency", type=int, default=int(env("BENCH_CONCURRENCY", "16")))
    p.add_argument("--slices", type=int, default=int(env("BENCH_SLICES", "6")))
    p.add_argument("--instances", type=int, default=int(env("BENCH_INSTANCES", "3")))
    p.add_argument("--workloads", default=env("BENCH_WORKLOADS", "typical,busy,synthea,fetch,jwt,feedback"))
    p.add_argument("--fhir-delay-ms", type=float, default=float(env("BENCH_FHIR_DELAY_MS", "50")))
    p.add_argument("--output", type=Path, default=Path(env("BENCH_OUTPUT", str(servers.BENCH / "results.json"))))
    return p.parse_args()


async def probe(server: servers.Server, body: bytes, token: str | None = None) -> dict[str, Any]:
    """One request: its status, time and card topics (so the table says what was measured)."""
    started = time.perf_counter()
    try:
        status, payload = await loadgen.one("127.0.0.1", server.port, PATH, body, token=token)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    ms = round((time.perf_counter() - started) * 1000, 2)
    try:
        cards = orjson.loads(payload).get("cards", [])
        topics = [f"{c['source']['topic']['code']}({c['indicator']})" for c in cards]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        topics = []
    return {"status": status, "ms": ms, "cards": topics}


Makers = dict[int, Callable[[], bytes]]  # a server's port -> the bytes of its next request (a JWT of its own each)


async def alternate(sides: dict[str, list[servers.Server]], body: bytes, concurrency: int, duration: float,
                    warmup: float, slices: int, makers: Makers | None = None) -> dict[str, dict[str, Any]]:
    """Warm every process up, then drive the sides in turn, slice by slice, slice i on each side's process
    i modulo its count; one summary per side, pooled over its processes, with each process's throughput."""
    makers = makers or {}
    for procs in sides.values():
        for server in procs:
            await loadgen.run("127.0.0.1", server.port, PATH, body, concurrency, warmup, ramp=0,
                              next_request=makers.get(server.port))
    totals = {side: loadgen.Result() for side in sides}
    per_process = {side: [loadgen.Result() for _ in procs] for side, procs in sides.items()}
    rounds = max(slices, 1)
    backlogs: list[int] = []  # the service's cards not yet in its audit store, as each of its slices ends
    for i in range(rounds):
        for side, procs in sides.items():
            server = procs[i % len(procs)]
            part = await loadgen.run("127.0.0.1", server.port, PATH, body, concurrency, duration / rounds,
                                     cpu=server.cpu_seconds, next_request=makers.get(server.port))
            totals[side].add(part)
            per_process[side][i % len(procs)].add(part)
            if side == "service" and (backlog := await audit_backlog(server)) is not None:
                backlogs.append(backlog)
    out: dict[str, dict[str, Any]] = {}
    for side, result in totals.items():
        out[side] = result.summary()
        out[side]["processes_rps"] = [r.summary()["rps"] for r in per_process[side] if r.elapsed]
        if result.first_error:
            out[side]["first_error"] = result.first_error
    if backlogs:
        out["service"]["audit_backlog_max"] = max(backlogs)
    return out


async def audit_backlog(server: servers.Server) -> int | None:
    """The service's `cds_audit_backlog{kind="cards"}`: issued cards waiting for its audit store. Read as a slice
    ends, it shows whether the store keeps up with the load (a few writer intervals' worth) or falls behind."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"{server.base_url}/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith('cds_audit_backlog{kind="cards"}'):
            return int(float(line.split()[-1]))
    return None


def ratios(load: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    s, f = load.get("service", {}), load.get("floor", {})

    def div(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    return {"throughput": div(s.get("rps"), f.get("rps")), "p50": div(s.get("p50_ms"), f.get("p50_ms")),
            "p99": div(s.get("p99_ms"), f.get("p99_ms"))}


async def stub_stats(stub: servers.Server, reset: bool = False) -> dict[str, Any]:
    """The stub's counters since the last reset; `reset` zeroes them after reading."""
    async with httpx.AsyncClient(base_url=stub.base_url, timeout=5) as client:
        stats = (await client.get("/__stats")).json()
        if reset:
            await client.post("/__reset")
        return stats


async def bench_workload(name: str, body: bytes, n: int | None, sides: dict[str, list[servers.Server]],
                         args: argparse.Namespace, stub: servers.Server | None = None,
                         ehr: ehrjwt.Ehr | None = None) -> dict[str, Any]:
    token = ehr.token(sides["service"][0].port, PATH) if ehr is not None else None
    result: dict[str, Any] = {"resources": n, "body_bytes": len(body),
                              "probe": {side: await probe(procs[0], body, token if side == "service" else None)
                                        for side, procs in sides.items()}}
    if stub is not None:
        await stub_stats(stub, reset=True)
    makers: Makers = {}
    if ehr is not None:  # enough tokens for 1,000 calls a second (ES384 verification alone caps it below that)
        per_process = int(1000 * (args.warmup + args.duration / len(sides["service"]) + 2))
        makers = {s.port: ehr.requests(s.port, PATH, body, per_process) for s in sides["service"]}
    result["load"] = await alternate(sides, body, args.concurrency, args.duration, args.warmup, args.slices, makers)
    result["load"]["ratio"] = ratios(result["load"])
    result["load"]["concurrency"] = args.concurrency
    if name in ("synthea", "fetch"):  # latency without queueing: one request at a time
        serial_s = max(args.duration / 2, 1.0)
        if stub is not None:  # warm-up and all slices under load
            result["stub_under_load"] = await stub_stats(stub, reset=True)
        result["serial"] = await alternate(sides, body, 1, serial_s, min(args.warmup, 1.0), args.slices)
        result["serial"]["ratio"] = ratios(result["serial"])
        result["serial"]["concurrency"] = 1
        if stub is not None:
            result["stub_serial"] = await stub_stats(stub)
    if stub is not None:
        slowest = args.fhir_delay_ms
        result["fetch"] = {
            "queries": len(DELAY_SHARES), "slowest_query_ms": slowest,
            "queries_in_series_ms": round(sum(DELAY_SHARES.values()) * slowest, 1),
            "added_ms": {mode: {k: _minus(result[mode]["service"][f"{k}_ms"], slowest) for k in ("p50", "p99")}
                         for mode in ("load", "serial")},
        }
    return result


def _minus(value: float | None, delay: float) -> float | None:
    return None if value is None else round(value - delay, 2)


async def main_async(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "uvloop" or "asyncio"
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": servers.machine(),
        "stack": servers.stack_versions(), "code": servers.git_state(),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
                     "slices": args.slices, "instances": args.instances, "fhir_delay_ms": args.fhir_delay_ms},
        "generator": f"closed-loop raw HTTP/1.1 over asyncio ({loop_name}), in the orchestrating process; it "
                     f"shares the machine's {os.cpu_count()} cores with the servers",
        "workloads": {},
    }
    count = max(args.instances, 1)
    sides = {"service": [servers.start_service(_own_dir(log_dir, f"service-{k + 1}")) for k in range(count)],
             "floor": [servers.start_floor(_own_dir(log_dir, f"floor-{k + 1}")) for k in range(count)]}
    started = [*sides["service"], *sides["floor"]]
    stub = None
    try:
        if "fetch" in chosen:
            data_file = log_dir / "fetch-record.json"
            data_file.write_bytes(orjson.dumps(workloads.record(workloads.SIZES["typical"])))
            delays = {k: share * args.fhir_delay_ms for k, share in DELAY_SHARES.items()}
            stub = servers.start_stub(log_dir, data_file, TOKEN, json.dumps(delays))
            started.append(stub)
        for server in started:
            await asyncio.to_thread(server.wait_healthy, 90.0)
        report.preamble(results)
        for name in chosen:
            if name == "fetch" and stub is not None:
                n = workloads.SIZES["typical"]
                body = orjson.dumps(workloads.hook_request(None, fhir_server=f"{stub.base_url}/fhir", token=TOKEN))
            elif name in workloads.SIZES or name in ("jwt", "feedback"):
                n = workloads.SIZES[name if name in workloads.SIZES else "typical"]
                body = orjson.dumps(workloads.hook_request(workloads.record(n)))
            else:
                say(f"unknown workload {name!r}: skipped", flush=True)
                continue
            try:
                if name == "jwt":
                    wl = await bench_jwt(body, n, sides["floor"], args, log_dir)
                elif name == "feedback":
                    wl = await bench_feedback(body, n, args, log_dir)
                else:
                    wl = await bench_workload(name, body, n, sides, args, stub if name == "fetch" else None)
            except Exception as exc:  # noqa: BLE001 - report and go on: the benchmark never fails on numbers
                wl = {"error": f"{type(exc).__name__}: {exc}"}
            results["workloads"][name] = wl
            report.workload(name, wl)
        results["machine"]["load_average_at_end"] = servers.machine()["load_average_at_start"]
        results["derived"] = report.derived(results["workloads"])
        report.summary(results)
    finally:
        for server in started:
            server.stop()
    return results


async def bench_jwt(body: bytes, n: int, floors: list[servers.Server], args: argparse.Namespace,
                    log_dir: Path) -> dict[str, Any]:
    """The service as production runs it (every call's JWT verified, its jti claimed), in processes of its own
    started for this workload only: idle, they would still reread the store each second during the others."""
    ehr = ehrjwt.Ehr()
    procs = [servers.start_service(_own_dir(log_dir, f"service-jwt-{k + 1}"), ehr.settings)
             for k in range(len(floors))]
    try:
        for server in procs:
            await asyncio.to_thread(server.wait_healthy, 90.0)
        return await bench_workload("jwt", body, n, {"service": procs, "floor": floors}, args, ehr=ehr)
    finally:
        for server in procs:
            server.stop()
        ehr.close()


async def bench_feedback(body: bytes, n: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """CDS Hooks feedback at the benchmark's concurrency, one `overridden` card a call, to service processes of its
    own: a card answered here is not shown again at later hooks (issue 16), which would change the others'
    workloads. Each process first answers `FEEDBACK_CARDS_CALLS` typical hook calls; the feedback goes round their
    cards, each call with a timestamp of its own, so that every call stores a new entry. No floor: it has no
    feedback endpoint."""
    procs = [servers.start_service(_own_dir(log_dir, f"service-feedback-{k + 1}")) for k in range(args.instances)]
    try:
        for server in procs:
            await asyncio.to_thread(server.wait_healthy, 90.0)
        cards = {server.port: await issue_cards(server, body, FEEDBACK_CARDS_CALLS) for server in procs}
        first = procs[0]
        status, _ = await loadgen.one("127.0.0.1", first.port, FEEDBACK_PATH, feedback_body(*cards[first.port][0]))
        makers: Makers = {port: feedback_requests(port, issued) for port, issued in cards.items()}
        load = await alternate({"service": procs}, body, args.concurrency, args.duration, args.warmup, args.slices,
                               makers)
        load["concurrency"] = args.concurrency
        return {"resources": n, "body_bytes": len(feedback_body(*cards[first.port][0])),
                "cards_per_process": min(len(c) for c in cards.values()),
                "probe": {"service": {"status": status}}, "load": load}
    finally:
        for server in procs:
            server.stop()


async def issue_cards(server: servers.Server, body: bytes, calls: int) -> list[tuple[str, Any]]:
    """`calls` hook calls at concurrency 16: each card's uuid and its first override reason."""
    out: list[tuple[str, Any]] = []
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status, payload = await loadgen.one("127.0.0.1", server.port, PATH, body)
            if status == 200:
                out.extend((c["uuid"], (c.get("overrideReasons") or [None])[0])
                           for c in orjson.loads(payload).get("cards", []))

    await asyncio.gather(*(worker() for _ in range(16)))
    if not out:
        raise RuntimeError("the service issued no cards to give feedback on")
    return out


def feedback_body(card: str, reason: Any) -> bytes:
    entry: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": datetime.now(UTC).isoformat()}
    if reason is not None:
        entry["overrideReason"] = {"reason": reason}
    return orjson.dumps({"feedback": [entry]})


def feedback_requests(port: int, cards: list[tuple[str, Any]]) -> Callable[[], bytes]:
    """The next feedback call to the service on `port`: the next card, round the list, answered anew."""
    turn = itertools.count()
    return lambda: loadgen.build_request("127.0.0.1", port, FEEDBACK_PATH,
                                         feedback_body(*cards[next(turn) % len(cards)]))


def _own_dir(log_dir: Path, name: str) -> Path:
    """A directory of one server process's own (its log, and the service's audit store)."""
    path = log_dir / name
    path.mkdir()
    return path


def main() -> int:
    args = options()
    log_dir = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    loadgen.install_uvloop()
    try:
        results = asyncio.run(main_async(args, log_dir))
    except RuntimeError as exc:
        say(f"\nbench: a server could not start, nothing was measured: {exc}\n(logs in {log_dir})", flush=True)
        return 2
    results["logs"] = str(log_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nresults written to {args.output}; server logs in {log_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
