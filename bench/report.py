"""Tables for `bench/run.py`: one per workload, the derived numbers (linearity, targets) and a README table.

Targets are reported as met or not met; nothing here fails the run.
"""

from __future__ import annotations

import sys
from typing import Any


def say(*parts: object, flush: bool = True) -> None:
    """Print a line of the report (stdout, flushed so that progress shows while the run goes on)."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    if flush:
        sys.stdout.flush()


ROW = "  {:<16}{:>10}{:>10}{:>10}{:>10}{:>12}{:>8}"


def _fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return "-" if value is None else str(value)


def preamble(results: dict[str, Any]) -> None:
    m, st, se = results["machine"], results["stack"], results["settings"]
    code = results["code"]
    say(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; load average {m['load_average_at_start']}",
          flush=True)
    say(f"code: commit {code['commit']}" + (" with uncommitted changes to cds/ or cards/"
                                              if code["service_code_modified"] else ""))
    if m["load_average_at_start"] and m["load_average_at_start"][0] > 0.5 * m["cores"]:
        say("WARNING: the machine is already busy (load average above); the numbers will be noisy")
    say(f"stack: Python {st['python']}, FastAPI {st['fastapi']}, uvicorn {st['uvicorn']}, uvloop {st['uvloop']}, "
          f"httptools {st['httptools']}, orjson {st['orjson']}")
    say(f"load: concurrency {se['concurrency']}, warm-up {se['warmup_s']:g} s, then {se['duration_s']:g} s per "
          f"endpoint in {se['slices']} alternating slices, over {se.get('instances', 1)} processes of each")
    say(f"NOTE: the load generator ({results['generator']}). Absolute numbers are lower than on a machine "
          "with a separate load client; the service/floor ratios are what to compare.", flush=True)


def _table(block: dict[str, Any], title: str) -> None:
    say(f"  {title} (concurrency {block.get('concurrency')})")
    say(ROW.format("", "req/s", "p50 ms", "p90 ms", "p99 ms", "CPU ms/req", "errors"))
    for name in ("service", "floor"):
        if name not in block:
            continue
        s = block[name]
        say(ROW.format(name, _fmt(s.get("rps")), _fmt(s.get("p50_ms"), 2), _fmt(s.get("p90_ms"), 2),
                         _fmt(s.get("p99_ms"), 2), _fmt(s.get("server_cpu_ms_per_request"), 2),
                         _fmt((s.get("errors") or 0) + (s.get("non_2xx") or 0), 0)))
        if s.get("non_2xx_statuses"):
            say(f"    non-2xx answers: {s['non_2xx_statuses']} (e.g. 412 when the Patient was not fetched in time)")
        if s.get("first_error"):
            say(f"    first error: {s['first_error']}")
    spread = {name: block[name].get("processes_rps") or [] for name in ("service", "floor") if name in block}
    if any(len(rps) > 1 for rps in spread.values()):
        say("  each process (req/s): " + "; ".join(f"{name} {', '.join(_fmt(x) for x in rps)}"
                                                   for name, rps in spread.items()))
    if "floor" not in block:
        return
    r = block.get("ratio", {})
    say(f"  service/floor: throughput {_fmt(r.get('throughput'), 3)}, p50 {_fmt(r.get('p50'), 2)}x, "
          f"p99 {_fmt(r.get('p99'), 2)}x")


def workload(name: str, wl: dict[str, Any]) -> None:
    say(f"\n== {name}", flush=True)
    if "error" in wl:
        say(f"  not measured: {wl['error']}", flush=True)
        return
    probe = wl["probe"]["service"]
    if name == "feedback":
        say(f"  one `overridden` card a call (body {wl['body_bytes']:,} bytes), to three service processes of its "
            f"own, each answered round {wl['cards_per_process']:,} cards it issued first; the first call answered "
            f"{probe.get('status')}; no floor (it has no feedback endpoint)")
        _table(wl["load"], "under load")
        say(flush=True)
        return
    what = f"{wl['resources']} resources" if name != "fetch" else f"prefetch absent, {wl['resources']} resources " \
                                                                  "fetched from the stub"
    if name == "jwt":
        what += (" and a JWT of its own on every call (ES384), verified, its jti claimed: the service as "
                 "production runs it; the floor checks nothing")
    say(f"  {what}; body {wl['body_bytes'] / 1024:,.1f} KiB; service answered {probe.get('status')} with cards "
          f"{', '.join(probe.get('cards') or []) or '(none)'} in {_fmt(probe.get('ms'), 1)} ms (first call)")
    _table(wl["load"], "under load")
    backlog = wl["load"].get("service", {}).get("audit_backlog_max")
    if backlog is not None:
        say(f"  audit store: at most {backlog:,} issued cards waiting to be written as a service slice ended "
            "(a few writer intervals' worth when it keeps up)")
    if "serial" in wl:
        _table(wl["serial"], "one request at a time")
    if "fetch" in wl:
        f = wl["fetch"]
        say(f"  FHIR stub: {f['queries']} queries per hook call, slowest {f['slowest_query_ms']:g} ms, "
              f"{f['queries_in_series_ms']:g} ms if run one after the other")
        for mode in ("serial", "load"):
            a = f["added_ms"][mode]
            say(f"  added over the slowest query ({mode}): p50 +{_fmt(a['p50'], 2)} ms, p99 +{_fmt(a['p99'], 2)} ms")
        u = wl.get("stub_under_load", {})
        if u:
            say(f"  under load the stub saw {u.get('requests')} FHIR requests, at most {u.get('max_in_flight')} "
                  f"in flight at once")
        s = wl.get("stub_serial", {})
        say(f"  stub saw at most {s.get('max_in_flight')} queries in flight at once with one hook call at a time "
              f"(parallel if {f['queries']}); unauthorized {s.get('unauthorized')}, not found {s.get('not_found')}")
    say(flush=True)


def derived(wls: dict[str, Any]) -> dict[str, Any]:
    """Per-request cost (server CPU per request under load), per-resource and marginal costs, and the targets."""
    out: dict[str, Any] = {"cost": {}, "targets": []}
    for who in ("service", "floor"):
        cost = {}
        for name in ("typical", "busy", "synthea"):
            block = wls.get(name, {}).get("load", {}).get(who, {})
            ms = block.get("server_cpu_ms_per_request") or (1000 / block["rps"] if block.get("rps") else None)
            if ms:
                n = wls[name]["resources"]
                cost[name] = {"resources": n, "ms_per_request": round(ms, 3),
                              "us_per_resource": round(ms * 1000 / n, 1)}
        if {"typical", "busy", "synthea"} <= cost.keys():
            t, b, s = (cost[k]["ms_per_request"] for k in ("typical", "busy", "synthea"))
            ta, tb = (b - t) / (cost["busy"]["resources"] - cost["typical"]["resources"]), \
                     (s - b) / (cost["synthea"]["resources"] - cost["busy"]["resources"])
            cost["marginal_us_per_resource"] = {"20->200": round(ta * 1000, 1), "200->1000": round(tb * 1000, 1)}
            cost["linearity"] = round(tb / ta, 2) if ta > 0 else None
        out["cost"][who] = cost
    targets = out["targets"]

    def target(what: str, value: Any, ok: bool | None) -> None:
        targets.append({"target": what, "value": value, "met": ok})

    r = wls.get("typical", {}).get("load", {}).get("ratio", {})
    if r:
        target("typical: throughput >= 50% of floor", r.get("throughput"), _ge(r.get("throughput"), 0.5))
        target("typical: p99 <= 2x floor p99", r.get("p99"), _le(r.get("p99"), 2.0))
    syn = wls.get("synthea", {})
    if "load" in syn:
        p50 = syn["load"]["service"].get("p50_ms")
        target(f"1,000 resources: p50 < 100 ms (concurrency {syn['load']['concurrency']})", p50, _le(p50, 100))
    if "serial" in syn:
        p50 = syn["serial"]["service"].get("p50_ms")
        target("1,000 resources: p50 < 100 ms (one at a time)", p50, _le(p50, 100))
    lin = out["cost"]["service"].get("linearity")
    if lin is not None:
        target("cost linear in resources: marginal cost 200->1000 <= 1.25x that of 20->200", lin, _le(lin, 1.25))
    fetch = wls.get("fetch", {}).get("fetch")
    if fetch:
        for mode in ("serial", "load"):
            a = fetch["added_ms"][mode]["p50"]
            target(f"fetch: p50 <= slowest query + 10 ms ({'one at a time' if mode == 'serial' else 'under load'})",
                   a, _le(a, 10))
    return out


def _le(value: Any, limit: float) -> bool | None:
    return value <= limit if isinstance(value, int | float) else None


def _ge(value: Any, limit: float) -> bool | None:
    return value >= limit if isinstance(value, int | float) else None


def summary(results: dict[str, Any]) -> None:
    d = results["derived"]
    say("== cost per request under load (server CPU time per request; 1 / throughput where /proc is missing)")
    for who, cost in d["cost"].items():
        parts = [f"{k} {v['ms_per_request']:.2f} ms ({v['us_per_resource']:.1f} us/resource)"
                 for k, v in cost.items() if isinstance(v, dict) and "ms_per_request" in v]
        marginal = cost.get("marginal_us_per_resource")
        say(f"  {who}: " + "; ".join(parts))
        if marginal:
            say(f"    marginal: {marginal['20->200']} us/resource from 20 to 200, {marginal['200->1000']} from 200 "
                  f"to 1,000 (ratio {cost.get('linearity')}: 1 is linear)")
    say("\n== targets (reported, not asserted)")
    for t in d["targets"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        say(f"  [{mark:>7}] {t['target']}: {_fmt(t['value'], 2)}")
    say("\n== README table\n")
    say(markdown(results), flush=True)


def markdown(results: dict[str, Any]) -> str:
    """The Performance table: one row per workload and mode."""
    lines = ["| workload | concurrency | service req/s | floor req/s | throughput ratio | service p50 / p99 (ms) "
             "| floor p50 / p99 (ms) | p99 ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, wl in results["workloads"].items():
        for mode in ("load", "serial"):
            block = wl.get(mode)
            if not block:
                continue
            if name == "feedback":  # the floor has no feedback endpoint
                s = block["service"]
                lines.append(f"| feedback (one card a call) | {block['concurrency']} | {_fmt(s['rps'])} | — | — | "
                             f"{_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])} | — | — |")
                continue
            s, f, r = block["service"], block["floor"], block["ratio"]
            if name == "fetch":  # the floor fetches nothing: its numbers say nothing about the fetch path
                lines.append(f"| fetch (prefetch absent) | {block['concurrency']} | {_fmt(s['rps'])} | — | — | "
                             f"{_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])} | — | — |")
                continue
            label = f"typical, a JWT per call ({wl['resources']} resources)" if name == "jwt" else \
                f"{name} ({wl['resources']} resources)"
            lines.append(f"| {label} | {block['concurrency']} | {_fmt(s['rps'])} | "
                         f"{_fmt(f['rps'])} | {_fmt(r['throughput'], 2)} | {_fmt(s['p50_ms'])} / "
                         f"{_fmt(s['p99_ms'])} | {_fmt(f['p50_ms'])} / {_fmt(f['p99_ms'])} | {_fmt(r['p99'], 2)} |")
    return "\n".join(lines)
