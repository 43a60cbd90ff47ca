"""The review dashboard for a clinic's CDS committee: per rule and version, cards issued, silent, accepted,
overridden and the override reasons over a chosen period, a chart of weekly counts and override rate (inline
SVG, no script, no CDN), and the same table as CSV.

It reads the audit store through the same queries as `/feedback/summary` (`Store.summary`, `Store.weekly`) and is
protected the same way (the caller's JWT, outside dev).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from ..errors import CDSError, InvalidRequest
from ..knowledge.loader import KnowledgeBase
from ..store import StoreError

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#22303c;color:#fff;padding:12px 24px}
header h1{margin:0;font-size:20px}
main{padding:16px 24px;max-width:1200px}
form{display:flex;gap:12px;align-items:end;flex-wrap:wrap;margin:8px 0 16px}
label{display:flex;flex-direction:column;font-size:12px;color:#555}
input,select,button{font:inherit;padding:4px 6px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e3e3e3;padding:6px 8px;
text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}
.reasons{margin:0;padding-left:16px}
.n{color:#555}
.status-silent{color:#666;font-style:italic}
.chart{width:100%;max-width:760px;background:#fff;border:1px solid #e3e3e3}
.axis{font-size:11px;fill:#555}
.legend text{font-size:11px;fill:#333}
.cards{display:flex;gap:16px;margin:8px 0 16px}
.kpi{background:#fff;border:1px solid #e3e3e3;padding:8px 14px}
.kpi b{display:block;font-size:20px}
.empty{color:#666}
"""


class _Unavailable(CDSError):
    status = 503
    issue_code = "transient"


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date (YYYY-MM-DD)", expression=name) from None


def period(since: str | None, until: str | None) -> tuple[date | None, date | None, datetime | None,
                                                          datetime | None]:
    """The chosen days (both included) and the matching [start, end) instants in UTC."""
    first, last = _day(since, "since"), _day(until, "until")
    if first and last and last < first:
        raise InvalidRequest("until is before since", expression="until")
    start = datetime.combine(first, time(), UTC) if first else None
    end = datetime.combine(last + timedelta(days=1), time(), UTC) if last else None
    return first, last, start, end


def rows(kb: KnowledgeBase, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary's rules with titles, statuses and override rates, for the table and the CSV."""
    out = []
    for r in summary["rules"]:
        rule = kb.by_id.get(r["rule"])
        issued = r["issued"]
        out.append({**r, "title": rule.title if rule else r["rule"],
                    "status": kb.status(rule) if rule else "unknown",
                    "override_rate": (r["overridden"] / issued) if issued else None})
    return out


def _reason(kb: KnowledgeBase, code: str) -> str:
    found = kb.override_reasons.get(code)
    return found.display if found else code


def chart(weeks: list[dict[str, Any]], first: date | None, last: date | None) -> str:
    """Weekly bars (cards shown, silent on top) and the override rate as a line, as inline SVG."""
    known = {date.fromisoformat(w["week"]): w for w in weeks}
    if not known and not (first and last):
        return '<p class="empty">No cards in this period.</p>'
    lo = min(known) if known else first
    hi = max(known) if known else last
    if first:
        lo = min(lo or first, first - timedelta(days=first.weekday()))
    if last:
        hi = max(hi or last, last - timedelta(days=last.weekday()))
    assert lo is not None and hi is not None
    series: list[dict[str, Any]] = []
    day = lo - timedelta(days=lo.weekday())
    while day <= hi and len(series) < 260:
        series.append(known.get(day, {"week": day.isoformat(), "issued": 0, "silent": 0, "accepted": 0,
                                      "overridden": 0}))
        day += timedelta(weeks=1)
    width, height, left, right, top, bottom = 760, 260, 48, 48, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([w["issued"] + w["silent"] for w in series] + [1])
    step = plot_w / len(series)
    bar = max(2.0, step * 0.6)
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="chart-title" class="chart"><title id="chart-title">Cards per week (shown, silent) '
             f'and override rate</title>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>']
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{round(peak * frac)}'
                     f'</text><text x="{left + plot_w + 6}" y="{y + 4:.1f}" class="axis">{int(frac * 100)}%</text>')
    points = []
    label_every = max(1, len(series) // 8)
    for i, w in enumerate(series):
        x = left + step * i + (step - bar) / 2
        shown_h = plot_h * w["issued"] / peak
        silent_h = plot_h * w["silent"] / peak
        base = top + plot_h
        tip = (f"week of {w['week']}: {w['issued']} shown, {w['silent']} silent, {w['accepted']} accepted, "
               f"{w['overridden']} overridden")
        parts.append(f'<g class="week" data-week="{e(w["week"])}" data-issued="{w["issued"]}" '
                     f'data-silent="{w["silent"]}" data-overridden="{w["overridden"]}"><title>{e(tip)}</title>'
                     f'<rect x="{x:.1f}" y="{base - shown_h:.1f}" width="{bar:.1f}" height="{shown_h:.1f}" '
                     f'fill="#3b6ea8"/><rect x="{x:.1f}" y="{base - shown_h - silent_h:.1f}" width="{bar:.1f}" '
                     f'height="{silent_h:.1f}" fill="#b7b7b7"/></g>')
        if w["issued"]:
            rate = w["overridden"] / w["issued"]
            points.append(f"{x + bar / 2:.1f},{top + plot_h * (1 - min(rate, 1)):.1f}")
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="axis">'
                         f'{e(w["week"][5:])}</text>')
    if points:
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#b3261e" stroke-width="2"/>')
        parts.extend(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="#b3261e"/>' for p in points)
    parts.append(f'<g class="legend" transform="translate({left},{height - 10})">'
                 '<rect width="10" height="10" y="-9" fill="#3b6ea8"/><text x="14">shown</text>'
                 '<rect x="70" width="10" height="10" y="-9" fill="#b7b7b7"/><text x="84">silent</text>'
                 '<line x1="140" x2="160" y1="-4" y2="-4" stroke="#b3261e" stroke-width="2"/>'
                 '<text x="164">override rate (overridden / shown, right axis)</text></g></svg>')
    return "".join(parts)


def page(kb: KnowledgeBase, table: list[dict[str, Any]], weeks: list[dict[str, Any]], first: date | None,
         last: date | None, rule: str | None, csv_url: str) -> str:
    e = html.escape
    body_rows = []
    for r in table:
        reasons = "".join(f"<li>{e(_reason(kb, code))} <span class=n>{n}</span></li>"
                          for code, n in r["override_reasons"].items())
        rate = "–" if r["override_rate"] is None else f"{r['override_rate']:.0%}"  # noqa: RUF001 - an en dash: no rate
        body_rows.append(
            f'<tr data-rule="{e(r["rule"])}" data-version="{e(r["version"])}">'
            f'<td><a href="../knowledge/{e(r["rule"])}">{e(r["title"])}</a><br><code>{e(r["rule"])}</code></td>'
            f'<td>{e(r["version"])}</td><td class="status-{e(r["status"])}">{e(r["status"])}</td>'
            f'<td class=num data-col=issued>{r["issued"]}</td><td class=num data-col=silent>{r["silent"]}</td>'
            f'<td class=num data-col=accepted>{r["accepted"]}</td>'
            f'<td class=num data-col=overridden>{r["overridden"]}</td><td class=num>{rate}</td>'
            f'<td><ul class=reasons>{reasons}</ul></td></tr>')
    if not body_rows:
        body_rows.append('<tr><td colspan=9 class="empty">No cards issued in this period.</td></tr>')
    options = "".join(f'<option value="{e(r.id)}"{" selected" if r.id == rule else ""}>{e(r.title)}</option>'
                      for r in sorted(kb.rules, key=lambda r: r.title))
    totals = {k: sum(r[k] for r in table) for k in ("issued", "silent", "accepted", "overridden")}
    chosen = (f"{first.isoformat() if first else 'the first card'} to {last.isoformat() if last else 'today'}")
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>CDS review dashboard</title><style>
{CSS}</style></head><body><header><h1>CDS review dashboard</h1>
<div>{e(kb.service.title)}: cards per rule and version, {e(chosen)}</div></header><main>
<form method=get><label>From <input type=date name=since value="{first.isoformat() if first else ''}"></label>
<label>To <input type=date name=until value="{last.isoformat() if last else ''}"></label>
<label>Chart <select name=rule><option value="">all rules</option>{options}</select></label>
<button type=submit>Show</button> <a id=csv href="{e(csv_url)}">Download CSV</a></form>
<div class=cards><div class=kpi><b id=total-issued>{totals["issued"]}</b>cards shown</div>
<div class=kpi><b id=total-silent>{totals["silent"]}</b>silent</div>
<div class=kpi><b id=total-accepted>{totals["accepted"]}</b>accepted</div>
<div class=kpi><b id=total-overridden>{totals["overridden"]}</b>overridden</div></div>
<h2>Per week{(": " + e(kb.by_id[rule].title)) if rule in kb.by_id else ""}</h2>{chart(weeks, first, last)}
<h2>Per rule and version</h2><table id=rules><thead><tr><th>Rule</th><th>Version</th><th>Status</th><th>Shown</th>
<th>Silent</th><th>Accepted</th><th>Overridden</th><th>Override rate</th><th>Override reasons</th></tr></thead>
<tbody>{"".join(body_rows)}</tbody></table>
<p class=empty>Counts are of cards issued in the period; feedback counts with the card it is about. Silent cards
were computed and recorded but never shown. Override rate = overridden / shown.</p></main></body></html>"""


def to_csv(kb: KnowledgeBase, table: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["rule", "version", "title", "status", "issued", "silent", "accepted", "overridden",
                     "override_rate", "override_reasons"])
    for r in table:
        rate = "" if r["override_rate"] is None else f"{r['override_rate']:.4f}"
        reasons = "; ".join(f"{code}={n}" for code, n in r["override_reasons"].items())
        cells = [r["rule"], r["version"], r["title"], r["status"], r["issued"], r["silent"], r["accepted"],
                 r["overridden"], rate, reasons]
        writer.writerow([_safe_cell(c) for c in cells])
    return out.getvalue()


def _safe_cell(value: Any) -> Any:
    """Spreadsheet formula injection: a text cell starting with = + - @ is prefixed with a quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


def router(kb: KnowledgeBase, claims: Callable[..., Any]) -> APIRouter:
    """`GET /feedback/dashboard` (HTML) and `GET /feedback/dashboard.csv`, behind the same JWT check as the summary."""
    api = APIRouter(dependencies=[Depends(claims)])

    async def read(request: Request, since: str | None, until: str | None,
                   rule: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], date | None, date | None]:
        first, last, start, end = period(since, until)
        if rule and rule not in kb.by_id:
            raise InvalidRequest(f"no rule {rule!r}", expression="rule")
        store = request.app.state.store
        try:
            await request.app.state.audit.flush()
            summary = await store.summary(start, end)
            weeks = await store.weekly(start, end, rule or None)
        except StoreError:
            raise _Unavailable("the audit store is unavailable; retry later") from None
        return rows(kb, summary), weeks, first, last

    @api.get("/feedback/dashboard", response_class=HTMLResponse)
    async def dashboard(request: Request, since: str | None = None, until: str | None = None,
                        rule: str | None = None) -> HTMLResponse:
        table, weeks, first, last = await read(request, since, until, rule)
        query = urlencode({k: v for k, v in (("since", since), ("until", until)) if v})
        csv_url = "dashboard.csv" + (f"?{query}" if query else "")
        return HTMLResponse(page(kb, table, weeks, first, last, rule, csv_url),
                            headers={"Cache-Control": "no-store"})

    @api.get("/feedback/dashboard.csv")
    async def dashboard_csv(request: Request, since: str | None = None, until: str | None = None) -> Response:
        table, _, first, last = await read(request, since, until, None)
        name = f"cds-review-{first or 'start'}-to-{last or datetime.now(UTC).date()}.csv"
        return Response(to_csv(kb, table), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"',
                                 "Cache-Control": "no-store"})

    return api
