"""A hostile FHIR server on loopback: answers chosen per resource type (a gzip bomb, a huge Bundle, a redirect).

Plain helper, no pytest fixture. `StubFhir(routes)`: `routes` maps a resource type (the path's first segment) to
an `Answer`; any other path gets an empty searchset. Every request is recorded in `.requests`.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

EMPTY = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0})


class Answer:
    """Status, headers and a body given as bytes or as a function returning an iterable of chunks (streamed,
    with no Content-Length, the connection closed at its end)."""

    def __init__(self, body: bytes | Callable[[], Iterable[bytes]] = EMPTY, status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = {"Content-Type": "application/fhir+json", **(headers or {})}


def json_answer(value: Any, status: int = 200) -> Answer:
    return Answer(orjson.dumps(value), status)


def gzip_bomb(inflated_bytes: int) -> Answer:
    """A gzip stream of `inflated_bytes` spaces, about a thousandth of that on the wire, streamed in 1 MiB blocks.

    Each block ends with a full flush, which resets the compressor's window, so the same compressed block can be
    sent again and again: 4 GiB cost 4 MiB to send and nothing to build.
    """
    block = b" " * 1_048_576
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    again = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    count = max(1, inflated_bytes // len(block))

    def chunks() -> Iterable[bytes]:
        yield head
        for _ in range(count - 1):
            yield again

    return Answer(chunks, headers={"Content-Encoding": "gzip"})


class StubFhir:
    def __init__(self, routes: dict[str, Answer]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> StubFhir:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stub.requests.append(self.path)
                kind = self.path.lstrip("/").split("/")[0].split("?")[0]
                answer = stub.routes.get(kind, Answer())
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                try:
                    if isinstance(answer.body, bytes):
                        self.send_header("Content-Length", str(len(answer.body)))
                        self.end_headers()
                        self.wfile.write(answer.body)
                        return
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    for chunk in answer.body():
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the service stopped reading: as it should
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
