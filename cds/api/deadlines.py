"""Deadlines for the short waits of every HTTP request (the request head, the body), on one timer per event loop.

A timer of its own for each wait (`asyncio.timeout`, `loop.call_later`) cost about 4-11 us under uvloop, twice per
hook call: a measurable share of it (bench/README.md, "Measurements behind the code"). These waits almost never
expire, so they share one timer, which checks them every `TICK_S` while any is set: setting and clearing one is a
dict insert and a dict pop. A deadline is acted on within `TICK_S` after it passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from weakref import WeakKeyDictionary

log = logging.getLogger("cds")

TICK_S = 0.1


class Deadlines:
    """The deadlines of one event loop, each under a key (its protocol, its task) with what to do when it passes."""

    def __init__(self) -> None:  # no reference to its loop: the loop's entry in _BY_LOOP must be able to go
        self._due: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def set(self, key: Hashable, delay_s: float, expire: Callable[[], object]) -> None:
        """Call `expire()` once `delay_s` has passed, unless `clear(key)` comes first (a key set again moves)."""
        loop = asyncio.get_running_loop()
        self._due[key] = (loop.time() + delay_s, expire)
        if self._timer is None:
            self._timer = loop.call_later(TICK_S, self._check)

    def clear(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._due

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        passed = [(key, expire) for key, (at, expire) in self._due.items() if at <= now]
        for key, expire in passed:
            del self._due[key]
            try:
                expire()
            except Exception:  # one failing callback must not stop the others, nor the timer
                log.exception("a request deadline's callback failed")
        self._timer = loop.call_later(TICK_S, self._check) if self._due else None


_BY_LOOP: WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = WeakKeyDictionary()


def deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The deadlines of `loop` (tests run several loops in one process: each has its own)."""
    found = _BY_LOOP.get(loop)
    if found is None:
        found = _BY_LOOP[loop] = Deadlines()
    return found
