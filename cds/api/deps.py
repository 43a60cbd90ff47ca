"""What the routes read from a request: the verified client, the service's base URL, the JSON body."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from ..errors import InvalidRequest, NotAuthenticated, PayloadTooLarge, RequestTimeout, ServiceUnavailable
from ..store import StoreError
from .deadlines import deadlines
from .security import ClientVerifier

log = logging.getLogger("cds")


async def client_claims(request: Request) -> dict[str, Any]:
    """CDS Hooks "Trusting CDS Clients": the EHR's JWT, verified for the exact endpoint called."""
    verifier: ClientVerifier | None = request.app.state.verifier
    if verifier is None:
        return {}
    try:
        return await verifier.verify(request.headers.get("authorization"), request.url.path)
    except NotAuthenticated as exc:
        log.warning("client JWT rejected: %s", exc.message, extra={"path": request.url.path})
        raise
    except StoreError as exc:
        log.error("JWT replay cache unavailable: %s", type(exc).__name__)
        raise ServiceUnavailable("the service cannot verify callers right now; retry later") from None

Client = Annotated[dict[str, Any], Depends(client_claims)]


class BaseUrl:
    """The service's base URL for links in cards: CDS_PUBLIC_BASE_URL, or (dev) from the request's Host header."""

    def __init__(self, public_base_url: str | None) -> None:
        self.public = public_base_url.rstrip("/") if public_base_url else None
        self.seen: dict[tuple[Any, ...], str] = {}

    def __call__(self, request: Request) -> str:
        if self.public:
            return self.public
        scope = request.scope
        key = (scope["scheme"], scope.get("server"), scope.get("root_path"), request.headers.get("host"))
        found = self.seen.get(key)
        if found is None:
            if len(self.seen) >= 256:
                self.seen.clear()
            found = self.seen[key] = str(request.base_url).rstrip("/")
        return found


def base_url(request: Request) -> str:
    """The base URL of the app serving this request (its `BaseUrl`, app.state.base_url)."""
    return request.app.state.base_url(request)  # type: ignore[no-any-return]


async def read_json(request: Request, limit: int, timeout_s: float = 10.0) -> Any:
    """The request body as JSON: 413 over the limit, 408 when it does not arrive in time, 400 when not JSON.

    The time limit is a deadline on the loop's shared timer (deadlines.py), not a timer of its own: when it passes,
    the task is cancelled while it waits for the body, and the cancellation becomes the 408.
    """
    task = asyncio.current_task()
    assert task is not None  # an ASGI app always runs in a task
    timer = deadlines(task.get_loop())
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer.set(task, timeout_s, expire)
    try:
        chunks = await _read_body(request, limit)
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    finally:
        timer.clear(task)
    if not chunks:
        raise InvalidRequest("the request body is empty; a JSON object is required")
    try:
        return orjson.loads(chunks)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks = await request.body()  # the server stops at the declared length
    else:  # chunked: count as it arrives
        buffer = bytearray()
        async for chunk in request.stream():
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise PayloadTooLarge(f"request body is over {limit} bytes")
        chunks = bytes(buffer)
    return chunks
