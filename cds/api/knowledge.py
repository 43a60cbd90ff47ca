"""The knowledge pages cards link to: /knowledge (every rule) and /knowledge/{rule_id}."""

from __future__ import annotations

import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from ..errors import ServiceNotFound
from ..knowledge.loader import KnowledgeBase
from .deps import base_url


def add_routes(app: FastAPI, kb: KnowledgeBase) -> None:

    @app.get("/knowledge", response_class=HTMLResponse)
    async def knowledge_index(request: Request) -> HTMLResponse:
        items = "".join(f'<li><a href="{base_url(request)}/knowledge/{r.id}">{html.escape(r.title)}</a> '
                        f"(rule v{r.version}, {r.indicator}{', silent' if r.id in kb.silent else ''})</li>"
                        for r in kb.rules)
        return HTMLResponse(page(kb.service.source_label,
                                 f"<p>{html.escape(kb.service.description)}</p><ul>{items}</ul>"))

    @app.get("/knowledge/{rule_id}", response_class=HTMLResponse)
    async def knowledge_page(rule_id: str) -> HTMLResponse:
        rule = kb.by_id.get(rule_id)
        if rule is None:
            raise ServiceNotFound(f"no rule {rule_id!r}")
        e = html.escape
        body = (f"<p>Rule <code>{e(rule.id)}</code>, version {rule.version}, status {e(kb.status(rule))}, "
                f"indicator {e(rule.indicator)}.</p>"
                + (f"<p><em>Extension beyond the source articles:</em> {e(rule.extension)}</p>" if rule.extension
                   else "")
                + f"<h2>Why it matters</h2><p>{e(rule.rationale)}</p><h2>What to do</h2><p>{e(rule.advice)}</p>"
                f"<h2>Source</h2><p>{e(rule.source.citation)}</p><blockquote>{e(rule.source.quote)}</blockquote>")
        return HTMLResponse(page(rule.title, body))



def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
