"""The shared deadline timer (cds/api/deadlines.py) and the body time limit built on it (deps.read_json)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any

import pytest
from starlette.requests import Request

from cds.api.deadlines import TICK_S, deadlines
from cds.api.deps import read_json
from cds.errors import RequestTimeout

pytestmark = pytest.mark.anyio


async def test_a_deadline_fires_once_soon_after_its_time_and_a_cleared_one_never() -> None:
    timer = deadlines(asyncio.get_running_loop())
    fired: list[tuple[str, float]] = []
    started = time.monotonic()
    timer.set("due", 0.15, lambda: fired.append(("due", time.monotonic() - started)))
    timer.set("cleared", 0.15, lambda: fired.append(("cleared", 0.0)))
    timer.set("moved", 0.05, lambda: fired.append(("moved", time.monotonic() - started)))
    timer.set("moved", 0.4, lambda: fired.append(("moved", time.monotonic() - started)))  # set again: later
    timer.clear("cleared")
    await asyncio.sleep(0.4 + 3 * TICK_S)
    assert [name for name, _ in fired] == ["due", "moved"]
    assert 0.15 <= fired[0][1] < 0.15 + 2 * TICK_S
    assert 0.4 <= fired[1][1] < 0.4 + 2 * TICK_S
    assert "due" not in timer and "moved" not in timer


async def test_a_failing_callback_stops_neither_the_others_nor_the_timer(caplog: pytest.LogCaptureFixture) -> None:
    timer = deadlines(asyncio.get_running_loop())
    fired: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    timer.set("fails", 0.01, fail)
    timer.set("first", 0.01, lambda: fired.append("first"))
    timer.set("later", 0.01 + 2 * TICK_S, lambda: fired.append("later"))
    await asyncio.sleep(5 * TICK_S)
    assert fired == ["first", "later"]
    assert "a request deadline's callback failed" in caplog.text


def test_each_event_loop_has_its_own_deadlines() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def mine() -> Any:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return deadlines(asyncio.get_running_loop())

    first, second = asyncio.run(mine()), asyncio.run(mine())
    assert first is not second
    gc.collect()
    assert [ref() for ref in loops] == [None, None]  # a closed loop is not kept alive by its deadlines' entry


def _stalled_request(sent: bytes, declared: int) -> Request:
    """A POST whose body stops after `sent` bytes of the `declared` length."""
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": sent, "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", str(declared).encode())]}
    return Request(scope, receive)


async def test_a_body_that_stops_arriving_is_a_request_timeout_and_the_task_is_not_left_cancelled() -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"did not arrive within 0\.2 s"):
        await read_json(_stalled_request(b'{"hook":', 1000), limit=10_000, timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 0.2 + 2 * TICK_S
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # a cancellation left pending would be raised here
    assert task not in deadlines(asyncio.get_running_loop())


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    reading = asyncio.create_task(read_json(_stalled_request(b"{", 1000), limit=10_000, timeout_s=5))
    await asyncio.sleep(0.05)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert reading not in deadlines(asyncio.get_running_loop())


async def test_a_body_in_time_is_read_and_its_deadline_cleared() -> None:
    body = b'{"hook": "order-select"}'

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/",
                       "headers": [(b"content-length", str(len(body)).encode())]}, receive)
    assert await read_json(request, limit=10_000, timeout_s=0.05) == {"hook": "order-select"}
    await asyncio.sleep(0.05 + 2 * TICK_S)  # past the deadline: nothing is cancelled
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0 and task not in deadlines(asyncio.get_running_loop())
