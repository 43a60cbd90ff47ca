"""Slow and oversized clients against the real service (raw sockets): a head that never ends gets 408, a body that
stops arriving gets 408, too many or too large headers get 431, and idle connections are closed; each within its
timeout plus 2 s, and the service keeps answering others."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import Service

HOOK = "/cds-services/mesotherapy-contraindications"
TIMEOUT_S = 1.0
MARGIN_S = 2.0


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service({"CDS_ENV": "dev", "CDS_HTTP_HEAD_TIMEOUT_S": str(TIMEOUT_S),
                  "CDS_HTTP_BODY_TIMEOUT_S": str(TIMEOUT_S), "CDS_HTTP_KEEPALIVE_S": "1"}) as svc:
        yield svc


def connect(svc: Service) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=TIMEOUT_S + MARGIN_S + 5)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the service sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def healthy(svc: Service) -> bool:
    return httpx.get(svc.base_url + "/healthz", timeout=2).status_code == 200


def test_a_head_that_never_ends_gets_408(service: Service) -> None:
    with connect(service) as s:
        s.sendall(b"POST " + HOOK.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        answer, waited = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert waited < TIMEOUT_S + MARGIN_S
    assert healthy(service)


def test_a_slow_header_sender_is_cut_off(service: Service) -> None:
    started = time.monotonic()
    answer = b""
    with connect(service) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        try:
            for i in range(200):  # one header every 0.1 s: each byte resets no timer
                s.sendall(b"X-Slow-%d: y\r\n" % i)
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        with contextlib.suppress(OSError):
            answer, _ = read_until_closed(s)
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    assert healthy(service)


def test_a_body_that_stops_arriving_gets_408(service: Service) -> None:
    with connect(service) as s:
        s.sendall(b"POST " + HOOK.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"hook\":")
        answer, waited = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"OperationOutcome" in answer
    assert waited < TIMEOUT_S + MARGIN_S
    assert healthy(service)


@pytest.mark.parametrize("head", [
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
                 + b"\r\n", id="ten-thousand-headers"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_048_576 + b"\r\n\r\n", id="one-huge-header"),
])
def test_oversized_heads_get_431(service: Service, head: bytes) -> None:
    with connect(service) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head)
        answer, _ = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert healthy(service)


def test_ordinary_requests_with_many_headers_still_pass(service: Service) -> None:
    headers = {f"X-Ok-{i}": "v" * 100 for i in range(50)}
    assert httpx.get(service.base_url + "/healthz", headers=headers).status_code == 200


@pytest.mark.parametrize("after_a_request", [False, True])
def test_idle_connections_are_closed(service: Service, after_a_request: bool) -> None:
    with connect(service) as s:
        if after_a_request:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):  # head and body may arrive in separate segments
                chunk = s.recv(65536)
                assert chunk, first
                first += chunk
            assert first.startswith(b"HTTP/1.1 200")
        answer, waited = read_until_closed(s)
    assert answer == b""
    assert waited < TIMEOUT_S + MARGIN_S
