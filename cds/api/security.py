"""Trusting CDS clients: the EHR's JWT, the issuer allow-list, the jti replay cache and patient pseudonyms.

The verifier follows CDS Hooks "Trusting CDS Clients" and its JWT best practice: the issuer must be
configured, `aud` is the exact public URL called, the key is picked by `kid` from the issuer's pinned JWKS
(or from a `jku` on the issuer's list; a `jku` not on it is never fetched, and the token is verified with the
issuer's configured keys when its `kid` is among them, as the CDS Hooks Sandbox's tokens need), only
RS/PS/ES 256/384 are accepted, and every `jti` is used once. Only configured URLs are ever fetched. A
rejection raises `NotAuthenticated(reason)`: the reason is for the log, never for the caller, and the token
itself is never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
import yaml
from jwt import PyJWK, PyJWS
from jwt.exceptions import PyJWTError
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from ..errors import NotAuthenticated
from ..fhir.client import is_loopback

log = logging.getLogger("cds.security")

# alg -> (JWK kty, EC curve or None)
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "PS256": ("RSA", None), "PS384": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"),
}
_PUBLIC_MEMBERS = {"RSA": ("kty", "n", "e"), "EC": ("kty", "crv", "x", "y")}
_SCHEMES = ("http", "https")
MAX_TOKEN_CHARS = 8192
MAX_JWKS_BYTES = 256 * 1024
JWKS_TIMEOUT_S = 2.0
_JWS = PyJWS()
_PROCESS_KEY = secrets.token_bytes(32)


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class IssuerConfig:
    """One trusted issuer: where its keys come from and which tenants it may speak for."""

    issuer: str
    jwks_url: str | None = None
    jku: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    jwks: dict[str, dict[str, Any]] | None = field(default=None, compare=False)  # inline keys, by kid


def index_jwks(doc: Any) -> dict[str, dict[str, Any]]:
    """Index a JWK Set by kid: public members of RSA/EC signing keys only; duplicated kids are dropped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWK Set must be an object with a "keys" array')
    keys: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or not isinstance(kid := jwk.get("kid"), str) or not kid:
            continue
        if jwk.get("kty") not in _PUBLIC_MEMBERS or jwk.get("use", "sig") != "sig":
            continue
        if kid in seen:
            keys.pop(kid, None)  # a kid must be unique within the set: an ambiguous kid is never used
            continue
        seen.add(kid)
        public = {m: jwk[m] for m in _PUBLIC_MEMBERS[jwk["kty"]] if m in jwk}
        if isinstance(jwk.get("alg"), str):
            public["alg"] = jwk["alg"]
        keys[kid] = public
    return keys


def _http_url(value: str) -> str:
    if urlsplit(value).scheme not in _SCHEMES:
        raise ValueError("not http(s)")
    return value


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _inline_jwks(value: Any) -> dict[str, dict[str, Any]]:
    try:
        return index_jwks(value)
    except ValueError as exc:
        raise PydanticCustomError("jwks", "{error}", {"error": str(exc)}) from None


_Url = Annotated[str, AfterValidator(_http_url)]


@with_config(ConfigDict(strict=True, extra="forbid"))
class _IssuerEntry(TypedDict, total=False):
    """One issuer in CDS_TRUSTED_ISSUERS; for jku and tenants a string stands for a list of one."""

    jwks_url: _Url | None
    jku: Annotated[list[_Url], BeforeValidator(_one_or_more)]
    tenants: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], BeforeValidator(_one_or_more)]
    jwks: Annotated[dict[str, dict[str, Any]], PlainValidator(_inline_jwks)]  # indexed by kid


_ISSUERS = TypeAdapter(dict[Annotated[str, StringConstraints(min_length=1)], _IssuerEntry])
_ISSUER_FIELDS = {"jwks_url": "an http(s) URL", "jku": "a string or a list of strings, each an http(s) URL",
                  "tenants": "a string or a list of strings", "jwks": 'a JWK Set (an object with a "keys" array)'}


def _issuer_problem(exc: ValidationError) -> str:
    """The first problem, named by the pydantic error's loc: (issuer, field, ...)."""
    errors = exc.errors(include_url=False)
    loc = errors[0]["loc"]
    if len(loc) < 2 or loc[1] == "[key]":
        return ("trusted issuers: expected an object mapping each issuer (a non-empty string) to its configuration"
                if len(loc) != 1 else f"trusted issuer {loc[0]!r}: expected an object with {', '.join(_ISSUER_FIELDS)}")
    if errors[0]["type"] == "extra_forbidden":
        unknown = sorted(str(e["loc"][1]) for e in errors if e["type"] == "extra_forbidden" and e["loc"][0] == loc[0])
        return f"trusted issuer {loc[0]!r}: unknown field(s) {unknown}; allowed: {sorted(_ISSUER_FIELDS)}"
    if errors[0]["type"] == "jwks":  # index_jwks says what is wrong with the set
        return f"trusted issuer {loc[0]!r}: inline jwks: {errors[0]['msg']}"
    return f"trusted issuer {loc[0]!r}: {loc[1]} must be {_ISSUER_FIELDS[str(loc[1])]}"


def _issuer(issuer: str, entry: _IssuerEntry) -> IssuerConfig:
    jwks_url, inline = entry.get("jwks_url"), entry.get("jwks")
    if inline is not None and jwks_url:
        raise ValueError(f"trusted issuer {issuer!r}: give either an inline jwks or a jwks_url, not both")
    if inline is not None and not inline:
        raise ValueError(f"trusted issuer {issuer!r}: inline jwks holds no usable RSA/EC key with a kid")
    if not (jwks_url or entry.get("jku") or inline):
        raise ValueError(f"trusted issuer {issuer!r}: needs a jwks_url, a jku list or an inline jwks")
    return IssuerConfig(issuer, jwks_url, tuple(entry.get("jku", ())), tuple(entry.get("tenants", ())), inline)


def parse_trusted_issuers(value: str | None) -> dict[str, IssuerConfig]:
    """Parse CDS_TRUSTED_ISSUERS: inline JSON or a path to a .json/.yaml/.yml file; ValueError if invalid."""
    text = (value or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"trusted issuers: invalid inline JSON ({exc})") from None
    else:
        path = Path(text).expanduser()
        if path.suffix.lower() not in (".json", ".yaml", ".yml") or not path.is_file():
            raise ValueError(f"trusted issuers: {path} is neither inline JSON "
                             "nor an existing .json/.yaml/.yml file")
        try:
            raw = path.read_text(encoding="utf-8")
            doc = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"trusted issuers: cannot read {path}: {exc}") from None
    try:
        entries = _ISSUERS.validate_python(doc)
    except ValidationError as exc:
        raise ValueError(_issuer_problem(exc)) from None
    return {iss: _issuer(iss, entry) for iss, entry in entries.items()}


def _https_or_loopback(url: str) -> bool:
    scheme = urlsplit(url).scheme.lower()
    return scheme == "https" or (scheme == "http" and is_loopback(url))


def check_production_settings(settings: Any) -> list[str]:
    """Problems that must stop a non-dev start (empty list = fine); dev mode is never blocked."""
    if settings.env == "dev":
        return []
    problems: list[str] = []
    if not settings.jwt_required:
        problems.append("CDS_REQUIRE_JWT=false is only allowed with CDS_ENV=dev")
    try:
        issuers = parse_trusted_issuers(settings.trusted_issuers)
    except ValueError as exc:
        issuers = {}
        problems.append(f"CDS_TRUSTED_ISSUERS is invalid: {exc}")
    else:
        if not issuers:
            problems.append("CDS_TRUSTED_ISSUERS is not set: no EHR could call the service")
    if not settings.public_base_url:
        problems.append("CDS_PUBLIC_BASE_URL is not set: the JWT audience cannot be checked")
    elif not _https_or_loopback(settings.public_base_url):
        problems.append(f"CDS_PUBLIC_BASE_URL must be https (or http on loopback): "
                        f"{settings.public_base_url}")
    key = settings.pseudonym_key
    if key is None or not key.get_secret_value():
        problems.append("CDS_PSEUDONYM_KEY is not set: patient ids could not be pseudonymised")
    for cfg in issuers.values():
        for url in ([cfg.jwks_url] if cfg.jwks_url else []) + list(cfg.jku):
            if not _https_or_loopback(url):
                problems.append(f"issuer {cfg.issuer}: key URL must be https (or http on loopback): {url}")
    for url in settings.allowed_fhir_servers:
        if not _https_or_loopback(url):
            problems.append(f"CDS_ALLOWED_FHIR_SERVERS: must be https (or http on loopback): {url}")
    return problems


# ---------------------------------------------------------------- replay cache and pseudonyms

@runtime_checkable
class ReplayCache(Protocol):
    """Shared store of used jti keys; must hold across workers and replicas in production."""

    async def claim(self, key: str, expires_at: float) -> bool:
        """True the first time `key` is claimed before it expires, False if it was already seen."""
        ...


class FallbackReplayCache:
    """The shared (database) replay cache, falling back to this process's memory while the database is down.

    A store outage must not stop cards (issue 5), so during one a replay is still refused by this process but
    no longer across replicas; every fallback is logged and counted.
    """

    def __init__(self, shared: ReplayCache, on_fallback: Callable[[Exception], None]) -> None:
        self._shared = shared
        self._local = MemoryReplayCache()
        self._on_fallback = on_fallback

    async def claim(self, key: str, expires_at: float) -> bool:
        if not await self._local.claim(key, expires_at):
            return False
        try:
            return await self._shared.claim(key, expires_at)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep serving with the local cache
            self._on_fallback(exc)
            return True


class MemoryReplayCache:
    """In-process replay cache, for tests and a single worker."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._seen: dict[str, float] = {}
        self._clock = clock

    async def claim(self, key: str, expires_at: float) -> bool:
        """Claim `key` until `expires_at` (epoch seconds)."""
        now = self._clock()
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        if self._seen.get(key, -math.inf) > now:
            return False
        self._seen[key] = expires_at
        return True


@lru_cache(maxsize=4096)  # the same patient comes back at every hook call
def pseudonym(value: str, key: bytes) -> str:
    """Keyed hash (HMAC-SHA256, 16 hex chars) of a patient id, for logs and stored records."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def pseudonym_key(settings: Any) -> bytes:
    """The configured CDS_PSEUDONYM_KEY, or a random per-process key when none is set (dev)."""
    secret = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key is not None else ""
    return secret.encode("utf-8") if secret else _PROCESS_KEY


# ---------------------------------------------------------------- the verifier

@dataclass
class _KeySet:
    keys: dict[str, dict[str, Any]]
    fetched_at: float
    parsed: dict[tuple[str, str], PyJWK] = field(default_factory=dict)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise NotAuthenticated("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthenticated("Authorization scheme is not Bearer, or the credential is empty")
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise NotAuthenticated("bearer credential is not a compact JWT")
    return token


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        number = math.nan
    if not math.isfinite(number):
        raise NotAuthenticated(f"claim {name} missing or not a number")
    return number


class ClientVerifier:
    """Verifies the CDS client's bearer JWT on each call; one instance per process, shared by all requests."""

    max_lifetime_s = 3600  # CDS Hooks best practice: tokens live no more than an hour

    def __init__(self, settings: Any, http: httpx.AsyncClient, replay: ReplayCache,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.issuers = parse_trusted_issuers(settings.trusted_issuers)
        self.http = http
        self.replay = replay
        self.clock = clock
        self.fetches = 0  # JWKS HTTP requests made (for metrics and tests)
        self._sets: dict[str, _KeySet] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_refetch: dict[str, float] = {}
        self._last_failure: dict[str, float] = {}

    async def verify(self, authorization: str | None, path: str) -> dict[str, Any]:
        """Return the verified claims of the request's bearer JWT, or raise NotAuthenticated(reason)."""
        token = _bearer(authorization)
        try:
            parts = _JWS.decode_complete(token, options={"verify_signature": False})
            claims = json.loads(parts["payload"])
        except (PyJWTError, ValueError) as exc:
            raise NotAuthenticated(f"malformed JWT: {exc}") from None
        header = parts["header"]
        if not isinstance(claims, dict):
            raise NotAuthenticated("JWT payload is not a JSON object")
        alg, kid = header.get("alg"), header.get("kid")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.upper() != "JWT":  # RFC 7519 5.1: compared case-insensitively
            raise NotAuthenticated(f"JWT header typ must be 'JWT', got {header.get('typ')!r}")
        if alg not in ALGORITHMS:
            raise NotAuthenticated(f"JWT alg {alg!r} is not accepted")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise NotAuthenticated("JWT header has no usable kid")
        iss = claims.get("iss")
        cfg = self.issuers.get(iss) if isinstance(iss, str) else None
        if cfg is None:
            raise NotAuthenticated(f"issuer {str(iss)[:200]!r} is not trusted")
        self._check_claims(cfg, claims, path)
        jwk = await self._key(cfg, header, kid, alg)
        try:
            _JWS.decode_complete(token, key=jwk, algorithms=[alg])
        except PyJWTError as exc:
            raise NotAuthenticated(f"signature rejected (iss {iss}, kid {kid!r}): {exc}") from None
        replay_key = hashlib.sha256(f"{iss}\n{claims['jti']}".encode()).hexdigest()
        if not await self.replay.claim(replay_key, claims["exp"] + self.settings.jwt_leeway_s):
            raise NotAuthenticated(f"jti replayed (iss {iss})")
        return claims

    def _check_claims(self, cfg: IssuerConfig, claims: dict[str, Any], path: str) -> None:
        base = self.settings.public_base_url
        if not base:
            raise NotAuthenticated("CDS_PUBLIC_BASE_URL is not set, so no audience can be checked")
        expected = base.rstrip("/") + path
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if expected not in auds:
            raise NotAuthenticated(f"aud {str(aud)[:300]!r} is not {expected!r}")
        now, leeway = self.clock(), self.settings.jwt_leeway_s
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if exp + leeway <= now:
            raise NotAuthenticated(f"token expired {now - exp:.0f} s ago")
        if iat > now + leeway:
            raise NotAuthenticated(f"iat is {iat - now:.0f} s in the future")
        if exp > now + self.max_lifetime_s + leeway:
            raise NotAuthenticated(f"exp is more than {self.max_lifetime_s} s ahead")
        if "nbf" in claims and _number(claims, "nbf") > now + leeway:
            raise NotAuthenticated("token not yet valid (nbf)")
        if cfg.tenants and claims.get("tenant") not in cfg.tenants:
            raise NotAuthenticated(f"tenant {str(claims.get('tenant'))[:200]!r} not allowed for {cfg.issuer}")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 512:
            raise NotAuthenticated("jti missing or unusable")

    async def _key(self, cfg: IssuerConfig, header: dict[str, Any], kid: str, alg: str) -> PyJWK:
        jku = header.get("jku")
        if jku is not None and (jku in cfg.jku or jku == cfg.jwks_url):
            keyset = await self._remote(jku, kid)
        elif jku is not None and not (await self._configured_has(cfg, kid)):
            raise NotAuthenticated(f"jku {str(jku)[:300]!r} is not on the list of {cfg.issuer}, "
                                   f"and kid {kid!r} is not among its configured keys")
        elif cfg.jwks is not None:  # an unlisted jku is never fetched: the issuer's own keys decide
            keyset = _KeySet(cfg.jwks, math.inf)
        elif cfg.jwks_url:
            keyset = await self._remote(cfg.jwks_url, kid)
        else:
            raise NotAuthenticated(f"issuer {cfg.issuer} only trusts listed jku URLs and the token has none")
        jwk = keyset.keys.get(kid)
        if jwk is None:
            raise NotAuthenticated(f"kid {kid!r} is not in the JWKS of {cfg.issuer}")
        kty, crv = ALGORITHMS[alg]
        if jwk["kty"] != kty or (crv and jwk.get("crv") != crv) or jwk.get("alg", alg) != alg:
            raise NotAuthenticated(f"alg {alg} does not match key {kid!r} "
                                   f"({jwk['kty']} {jwk.get('crv', '')} {jwk.get('alg', '')})")
        parsed = keyset.parsed.get((kid, alg))
        if parsed is None:
            try:
                parsed = PyJWK(jwk, algorithm=alg)
            except PyJWTError as exc:
                raise NotAuthenticated(f"key {kid!r} of {cfg.issuer} is unusable: {exc}") from None
            if kty == "RSA" and parsed.key.key_size < 2048:
                raise NotAuthenticated(f"key {kid!r} of {cfg.issuer} is shorter than 2048 bits")
            keyset.parsed[(kid, alg)] = parsed
        return parsed

    async def _configured_has(self, cfg: IssuerConfig, kid: str) -> bool:
        """Is `kid` among the issuer's configured keys (inline, or at its configured jwks_url)?"""
        if cfg.jwks is not None:
            return kid in cfg.jwks
        if cfg.jwks_url:
            try:
                return kid in (await self._remote(cfg.jwks_url, kid)).keys
            except NotAuthenticated:
                return False
        return False

    async def _remote(self, url: str, kid: str) -> _KeySet:
        """The JWKS at url, cached; fetched if missing or stale, and once per interval on an unknown kid."""
        keyset = self._sets.get(url)
        if keyset and kid in keyset.keys and self.clock() - keyset.fetched_at < self.settings.jwks_cache_s:
            return keyset
        async with self._locks.setdefault(url, asyncio.Lock()):
            now, interval = self.clock(), self.settings.jwks_refresh_interval_s
            keyset, fetched = self._sets.get(url), False
            if (keyset is None or now - keyset.fetched_at >= self.settings.jwks_cache_s) \
                    and now - self._last_failure.get(url, -math.inf) >= interval:
                fetched = True
                keyset = await self._fetch(url, now) or keyset  # a stale set outlives a failed fetch
            if keyset is not None and kid not in keyset.keys and not fetched \
                    and now - self._last_refetch.get(url, -math.inf) >= interval:
                self._last_refetch[url] = now
                keyset = await self._fetch(url, now) or keyset
        if keyset is None:
            raise NotAuthenticated(f"JWKS {url} is unavailable")
        return keyset

    async def _fetch(self, url: str, now: float) -> _KeySet | None:
        self.fetches += 1
        try:
            async with self.http.stream("GET", url, timeout=JWKS_TIMEOUT_S, follow_redirects=False,
                                        headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError("JWKS too large")
            keyset = _KeySet(index_jwks(json.loads(body)), now)
        except (httpx.HTTPError, ValueError) as exc:
            self._last_failure[url] = now
            log.warning("JWKS fetch failed", extra={"jwks_url": url, "error": str(exc)[:300]})
            return None
        self._sets[url] = keyset
        log.info("JWKS fetched", extra={"jwks_url": url, "kids": sorted(keyset.keys)})
        return keyset
