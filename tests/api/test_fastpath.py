"""The hook fast path (cds/api/fastpath.py) answers exactly as the app's own route does, and never skips a
middleware: in process, through ASGI, the app as the server runs it against the app without the fast path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cds.api.app import create_app
from cds.api.fastpath import HookFastPath, with_fast_path
from cds.settings import Settings

from conftest import FIXTURES, with_dates

HOOK = "/cds-services/mesotherapy-order-select"


def pregnant_request() -> dict[str, Any]:
    path = FIXTURES / "scenarios" / "decision-male-female-birthsex-pregnancy-critical.json"
    scenario = json.loads(path.read_text(encoding="utf-8"))
    return with_dates(scenario["request"])  # type: ignore[no-any-return]


async def answers(served: ASGIApp, framework: Any, calls: list[dict[str, Any]]) -> list[httpx.Response]:
    async with framework.router.lifespan_context(framework):
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            return [await client.post(**call) for call in calls]


def shape(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body, without what differs by design between two calls (card and suggestion uuids)."""
    body = response.json()
    for card in body.get("cards", []):
        card.pop("uuid")
        for s in card.get("suggestions", []):
            s.pop("uuid", None)
    headers = {k: v for k, v in response.headers.items() if k not in ("date",)}
    return response.status_code, headers, body


CALLS = [
    {"url": HOOK, "json": pregnant_request()},
    {"url": HOOK, "content": b"{not json", "headers": {"content-type": "application/json"}},
    {"url": HOOK, "content": b"", "headers": {"content-type": "application/json"}},
    {"url": HOOK + "/", "json": {"hook": "order-select"}},
    {"url": "/cds-services/no-such-service", "json": pregnant_request()},
    {"url": HOOK, "content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}},
    {"url": "/cds-services/mesotherapy-patient-view", "json": pregnant_request()},  # the wrong hook for the id
]


@pytest.mark.anyio
async def test_the_fast_path_answers_as_the_router_does(tmp_path: Path) -> None:
    settings = Settings(env="dev", data_dir=tmp_path)
    fast_app = create_app(settings)
    served = with_fast_path(fast_app)
    assert isinstance(served, HookFastPath)
    routed_app = create_app(settings)
    fast = await answers(served, fast_app, CALLS)
    routed = await answers(routed_app, routed_app, CALLS)
    assert [r.status_code for r in fast] == [200, 400, 400, 400, 404, 413, 400]
    assert fast[0].json()["cards"][0]["source"]["topic"]["code"] == "pregnancy"
    for f, r in zip(fast, routed, strict=True):
        assert shape(f) == shape(r)


class Stamp:
    """A middleware added to the app after it was built: it must see the hook calls too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-stamp", b"1")]
            await send(message)

        await self.app(scope, receive, stamped)


@pytest.mark.anyio
async def test_a_middleware_added_while_the_fast_path_is_on_sees_every_hook_call(tmp_path: Path) -> None:
    framework = create_app(Settings(env="dev", data_dir=tmp_path))
    served = with_fast_path(framework)
    assert isinstance(served, HookFastPath)
    framework.add_middleware(Stamp)
    hook, error = await answers(served, framework, CALLS[:2])
    assert hook.status_code == 200 and hook.headers.get("x-stamp") == "1"
    assert error.status_code == 400 and error.headers.get("x-stamp") == "1"


def test_with_cors_the_router_serves_the_hooks(tmp_path: Path) -> None:
    framework = create_app(Settings(env="dev", data_dir=tmp_path, cors_origins=["https://ehr.example"]))
    assert with_fast_path(framework) is framework
