"""Reads from the EHR's FHIR server: bearer token, per-call timeout, and paging pinned to the server's origin.

A token is only ever sent to the `fhirServer` of the request, and only when that server is allowed; a `next`
link that leaves its origin is not followed, and the data behind it counts as not obtained. Every answer is read
in chunks under a byte cap (compressed and inflated alike, so a gzip bomb stops at the cap) and under the
request's deadline; large bodies are parsed in a worker thread, and a search stops at a cap on its entries.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import threading
import zlib
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import yarl

from .json import listed

FHIR_JSON = "application/fhir+json"
CHUNK = 65_536  # bytes read from the socket at a time
INFLATE_STEP = 1_048_576  # most bytes inflated per zlib call, so one call never runs long
THREAD_PARSE_BYTES = 262_144  # bodies larger than this are parsed (and their entries listed) in a worker thread
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 47}  # 47: zlib or gzip header, detected


class FhirError(Exception):
    """A FHIR read or search could not be completed; `reason` is safe to show to a clinician.

    `kind` is one of timeout, http_error, unreachable, foreign_link, too_large (the metrics' label values).
    """

    def __init__(self, reason: str, kind: str = "http_error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class TooManyEntries(FhirError):
    """A search had more entries than the cap: `resources` holds the first ones, which are still screened."""

    def __init__(self, limit: int, resources: list[dict[str, Any]]) -> None:
        super().__init__(f"record too large to screen completely: the search had more than {limit:,} entries, "
                         f"and only the first {limit:,} were screened", "too_large")
        self.resources = resources


class Limits:
    """What one hook request may cost in FHIR reads: per-answer bytes, entries per search, and the deadline
    (an event-loop time) by which everything, decompression and parsing included, must be done."""

    __slots__ = ("max_bytes", "max_entries", "deadline")

    def __init__(self, max_bytes: int, max_entries: int, deadline: float) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.deadline = deadline


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_allowed(url: str, allowed: list[str], loopback_ok: bool) -> bool:
    """Exact base-URL allow-list (scheme, host, port and path), plus loopback servers when permitted."""
    if urlsplit(url).scheme not in ("http", "https"):
        return False
    base = url.rstrip("/")
    if any(base == a.rstrip("/") for a in allowed):
        return True
    return loopback_ok and is_loopback(url)


class FhirClient:
    """Async FHIR reads for one hook request, over the service's shared aiohttp session.

    aiohttp rather than httpx here: with a hundred pooled connections (16 hook calls x 7 queries) httpcore scans
    its whole pool on every request, which made each FHIR read cost far more CPU than aiohttp's
    (bench/README.md, "Measurements behind the code").
    """

    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str | None, timeout_s: float,
                 max_pages: int, limits: Limits) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._origin = origin(self.base_url)
        # The session inflates nothing itself (api/app.py: auto_decompress=False): `_read` does, under the cap.
        self._headers = {"Accept": FHIR_JSON, "Accept-Encoding": "gzip, deflate"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout_s
        self._max_pages = max_pages
        self.limits = limits

    def same_origin(self, url: str) -> bool:
        return origin(url) == self._origin and urlsplit(url).path.startswith(urlsplit(self.base_url).path)

    async def get(self, query: str) -> Any:
        """GET a relative query (`Patient/1`, `Condition?patient=1`) or a same-origin absolute URL."""
        link = query.startswith(("http://", "https://"))  # a server's own `next` link is already encoded
        url = query if link else f"{self.base_url}/{query.lstrip('/')}"
        if not self.same_origin(url):
            raise FhirError("a link pointed outside the FHIR server, so it was not followed", "foreign_link")
        loop = asyncio.get_running_loop()
        left = self.limits.deadline - loop.time()
        if left <= 0:
            raise FhirError("not obtained within the request's deadline", "timeout")
        timeout = min(self._timeout, left)
        try:
            async with self._http.get(yarl.URL(url, encoded=link), headers=self._headers, allow_redirects=False,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                status = response.status
                if 300 <= status < 400:
                    raise FhirError(f"the FHIR server answered with a redirect (HTTP {status}) to another address, "
                                    "which the service does not follow")
                if status == 404 and "?" not in query:
                    return None
                if status >= 400:
                    raise FhirError(f"the FHIR server answered HTTP {status}")
                content = await self._read(response, loop)
        except TimeoutError:
            raise FhirError(f"the FHIR server did not answer within {timeout:g} s", "timeout") from None
        except (aiohttp.ClientError, ValueError):
            raise FhirError("the FHIR server could not be reached", "unreachable") from None
        if len(content) > THREAD_PARSE_BYTES:  # a big answer must not hold the event loop while it is parsed
            return await asyncio.to_thread(_GC_PAUSE.parse, content)
        return _parse(content)

    async def _read(self, response: aiohttp.ClientResponse, loop: asyncio.AbstractEventLoop) -> bytes:
        """The body, inflated, in chunks: over `max_bytes` (sent or inflated) or past the deadline it is given up."""
        cap = self.limits.max_bytes
        too_large = FhirError(f"the FHIR server's answer was larger than {cap:,} bytes, so it was not read",
                              "too_large")
        if (response.content_length or 0) > cap:
            raise too_large
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        inflate = None
        if encoding not in ("", "identity"):
            wbits = _WBITS.get(encoding)
            if wbits is None:
                raise FhirError(f"the FHIR server's answer was encoded as {encoding[:20]!r}, which the service "
                                "cannot read")
            inflate = zlib.decompressobj(wbits)
        body = bytearray()
        sent = 0
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                sent += len(chunk)
                if sent > cap:
                    raise too_large
                if inflate is None:
                    body += chunk
                else:
                    data = chunk
                    while data:
                        body += inflate.decompress(data, min(INFLATE_STEP, cap + 1 - len(body)))
                        if len(body) > cap:
                            raise too_large
                        data = inflate.unconsumed_tail
                        if data:
                            await asyncio.sleep(0)  # one chunk may inflate a thousandfold: let others run
                if loop.time() > self.limits.deadline:
                    raise FhirError("not obtained within the request's deadline", "timeout")
        except zlib.error:
            raise FhirError("the FHIR server's compressed answer could not be inflated") from None
        return bytes(body)

    async def complete(self, bundle: dict[str, Any]) -> list[dict[str, Any]]:
        """Every entry of a searchset, following `next` links on this server only, up to `max_entries`."""
        resources = await self.entries(bundle)
        pages = 1
        while (link := next_link(bundle)) is not None and len(resources) <= self.limits.max_entries:
            if pages >= self._max_pages:
                raise FhirError(f"more than {self._max_pages} pages of results")
            bundle = await self.get(link)
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or malformed_bundle(bundle):
                raise FhirError("a page of search results was not a readable Bundle")
            resources.extend(await self.entries(bundle))
            pages += 1
        if len(resources) > self.limits.max_entries:
            raise TooManyEntries(self.limits.max_entries, resources[:self.limits.max_entries])
        return resources

    async def entries(self, bundle: dict[str, Any]) -> list[dict[str, Any]]:
        """`entries(bundle)`, in a worker thread when the Bundle is long (listing 100,000 entries takes a while)."""
        found = bundle.get("entry")
        if isinstance(found, list) and len(found) > 1000:
            return await asyncio.to_thread(entries, bundle)
        return entries(bundle)


class _GcPause:
    """Parses large bodies with the cyclic GC paused (process-wide, while any such parse runs).

    orjson holds the GIL for the whole parse, so a thread alone does not free the event loop; but two thirds of
    a big parse's time were the GC's full collections over the objects it was creating (100,000 entries:
    1.1 s with the GC, 0.3 s without). JSON has no reference cycles, so nothing is lost by not collecting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    def parse(self, content: bytes) -> Any:
        with self._lock:
            if self._running == 0:
                gc.disable()
            self._running += 1
        try:
            return _parse(content)
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    gc.enable()


_GC_PAUSE = _GcPause()


def _parse(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        raise FhirError("the FHIR server answered with something that is not JSON") from None


def malformed_bundle(bundle: dict[str, Any]) -> bool:
    """A Bundle whose `entry` or `link` is neither an array nor a lone object: what it holds cannot be known, so
    it must count as data not obtained, never as an empty result."""
    for key in ("entry", "link"):
        value = bundle.get(key)
        if value is not None and not isinstance(value, list) and not isinstance(value, dict):
            return True
    return False


def scan_bundle(bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """One pass over a Bundle's entries: its resources (leaving out search.mode=outcome entries and
    OperationOutcomes), and whether an OperationOutcome among them carries an error."""
    out = []
    failed = False
    for entry in listed(bundle.get("entry")):
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "OperationOutcome":
            failed = failed or any(isinstance(i, dict) and i.get("severity") in ("error", "fatal")
                                   for i in listed(resource.get("issue")))
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        out.append(resource)
    return out, failed


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of a Bundle, leaving out search.mode=outcome entries."""
    return scan_bundle(bundle)[0]


def error_outcome(value: Any) -> bool:
    """An OperationOutcome carrying an error, given as the value or as an entry of a Bundle."""
    if not isinstance(value, dict):
        return False
    kind = value.get("resourceType")
    return kind == "OperationOutcome" or (kind == "Bundle" and scan_bundle(value)[1])


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in listed(bundle.get("link")):
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None
