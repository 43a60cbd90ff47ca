"""The hook endpoint answered ahead of the framework: a small pure-ASGI wrapper around the FastAPI app.

Starlette's and FastAPI's layers (their middleware stack, exception middleware, router) cost a large share of a
typical hook call (bench/README.md, "Measurements behind the code"). `HookFastPath` sends a POST to a hook path
straight to the hook handler (the same one the router has, cds/api/hooks.py), turning its errors into the same
answers as the app's exception handlers (responses.error_response); everything else, lifespan included, goes to
the app. It steps aside, so the app's own route answers, whenever that could differ: a root path, and any
middleware the app has (CORS; one added later), which a hook call must never skip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .responses import error_response

Handler = Callable[[Request], Awaitable[Response]]


class HookFastPath:
    def __init__(self, app: FastAPI, handler: Handler, paths: dict[str, dict[str, str]]) -> None:
        self.app = app
        self.handler = handler
        self.paths = paths  # hook path -> its path_params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = self.paths.get(scope["path"]) if scope["type"] == "http" else None
        if params is None or scope["method"] != "POST" or scope.get("root_path") or self.app.user_middleware:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except Exception as exc:  # noqa: BLE001 - error_response logs an unexpected one with its traceback
            response = error_response(exc, request.url.path)
        await response(scope, receive, send)


def with_fast_path(app: FastAPI) -> ASGIApp:
    """The app to serve: `app` behind its hook fast path (`app.state.fast_path`, set by create_app), or `app`
    itself when it has none."""
    fast: tuple[Handler, dict[str, dict[str, str]]] | None = getattr(app.state, "fast_path", None)
    if fast is None:
        return app
    return HookFastPath(app, *fast)
