"""HTTP limits uvicorn does not have: a cap on the request head (header count and bytes) and a timeout for it.

uvicorn's httptools protocol accepts any number of headers of any size, and a request head that never ends, or a
connection that never sends one, is held forever (its keep-alive timer only runs between requests). This
subclass answers 431 to an oversized head and 408 to one that does not arrive within `head_timeout_s`, and
closes the connection. A body that stops arriving is cut off by the app (`deps.read_json`, 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings
from .deadlines import deadlines


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a connection that was answered and closed."""


class LimitedHttpTools(HttpToolsProtocol):
    max_headers = 100
    max_head_bytes = 32_768
    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_done = False
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False
        self._deadlines = deadlines(self.loop)  # the head's deadline: the loop's shared timer, not one per request

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's own
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            super().data_received(data)
        except _Refused:
            return
        if self._refused:
            return
        if self._head_done:
            self._head_bytes = 0
            return
        self._head_bytes += len(data)  # still inside a head: the parser holds all of it so far
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, "Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_done = False
        self._header_count = 0
        if self not in self._deadlines:  # armed when the connection opened: the first request keeps that time
            self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers or len(name) + len(value) > self.max_head_bytes:
            self._refuse(431, "Request Header Fields Too Large")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # between requests uvicorn's keep-alive timeout applies

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a parser error raised from our own refusal has been answered already
            super().send_400_response(msg)

    def _arm(self) -> None:
        self._deadlines.set(self, self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        self._deadlines.clear(self)

    def _head_timeout(self) -> None:
        if self._head_done or self.transport.is_closing():
            return
        if self._head_bytes or self._header_count:
            self._refuse(408, "Request Timeout")
        else:  # nothing sent: just close
            self._refused = True
            self.transport.close()

    def _refuse(self, status: int, phrase: str) -> None:
        self._refused = True
        self._disarm()
        body = phrase.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, phrase.encode(), len(body), body))
        self.transport.close()


def protocol(settings: Settings) -> type[LimitedHttpTools]:
    """The protocol class with this service's limits (a subclass: uvicorn builds one instance per connection)."""
    return type("CDSHttpProtocol", (LimitedHttpTools,), {
        "max_headers": settings.http_max_headers, "max_head_bytes": settings.http_max_head_bytes,
        "head_timeout_s": settings.http_head_timeout_s})
