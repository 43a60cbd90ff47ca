"""Trust layer: the client JWT verifier against real RS384/ES384 keys served from a JWKS on 127.0.0.1.

Every rejection asserts the logged reason too, so a token is refused for the reason under test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds.api.security import (
    ClientVerifier,
    MemoryReplayCache,
    ReplayCache,
    check_production_settings,
    parse_trusted_issuers,
    pseudonym,
    pseudonym_key,
)
from cds.errors import NotAuthenticated
from cds.logs import JsonFormatter, RedactFilter, redact
from cds.settings import Settings

from jwks_server import JwksServer

BASE = "http://127.0.0.1:8080"
PATH = "/cds-services/mesotherapy-contraindications"
AUD = BASE + PATH
ISS = "https://ehr.example.org"
_paths = itertools.count()


# ---------------------------------------------------------------- keys, tokens, settings

@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP384R1()),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[JwksServer]:
    with JwksServer() as s:
        yield s


def public_jwk(private: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig"})
    if alg:
        jwk["alg"] = alg
    return jwk


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def sign(private: Any, alg: str, kid: str | None, payload: dict[str, Any] | None = None,
         **header: Any) -> str:
    headers = {"kid": kid, **header}
    return jwt.encode(payload or claims(), private, algorithm=alg,
                      headers={k: v for k, v in headers.items() if v is not None or k == "typ"})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None = None) -> str:
    """A hand-made JWT: unsigned, or HMAC-SHA256 signed with `secret`."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{b64(signature)}"


def make_settings(issuers: dict[str, Any], **changes: Any) -> Settings:
    values: dict[str, Any] = {"env": "prod", "public_base_url": BASE, "trusted_issuers": json.dumps(issuers),
                              "pseudonym_key": "k", "jwt_leeway_s": 60, "jwks_cache_s": 3600,
                              "jwks_refresh_interval_s": 30.0, "allowed_fhir_servers": []}
    values.update(changes)
    return Settings(**values)


@pytest.fixture
def issuer(server: JwksServer, keys: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A fresh JWKS URL with rsa-1 (RS384) and ec-1 (ES384), and the issuer config pointing at it."""
    url = server.publish(f"/jwks-{next(_paths)}.json", {"keys": [public_jwk(keys["rsa"], "rsa-1", "RS384"),
                                                                  public_jwk(keys["ec"], "ec-1", "ES384")]})
    return url, {ISS: {"jwks_url": url}}


async def verify(settings: Settings, tokens: list[str | None], path: str = PATH,
                 clock: Callable[[], float] = time.time, between: Callable[[int], None] | None = None) -> list[Any]:
    """Verify tokens in order with one verifier; each result is the claims, or the rejection reason (str)."""
    async with httpx.AsyncClient() as http:
        verifier = ClientVerifier(settings, http, MemoryReplayCache(clock), clock)
        out: list[Any] = []
        for i, token in enumerate(tokens):
            if between:
                between(i)
            try:
                out.append(await verifier.verify(None if token is None else f"Bearer {token}", path))
            except NotAuthenticated as exc:
                out.append(exc.message)
        return out


def rejected(result: Any, reason: str) -> bool:
    assert isinstance(result, str), f"token was accepted: {result}"
    assert reason in result, result
    return True


# ---------------------------------------------------------------- happy paths

@pytest.mark.anyio
async def test_rs384_token_is_accepted(issuer, keys, server):
    _, cfg = issuer
    [result] = await verify(make_settings(cfg), [sign(keys["rsa"], "RS384", "rsa-1")])
    assert result["iss"] == ISS and result["aud"] == AUD


@pytest.mark.anyio
async def test_es384_token_is_accepted(issuer, keys):
    [result] = await verify(make_settings(issuer[1]), [sign(keys["ec"], "ES384", "ec-1")])
    assert result["iss"] == ISS


@pytest.mark.anyio
async def test_aud_array_containing_the_endpoint_is_accepted(issuer, keys):
    token = sign(keys["ec"], "ES384", "ec-1", claims(aud=["https://other.example.org", AUD]))
    assert isinstance((await verify(make_settings(issuer[1]), [token]))[0], dict)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "PS384"])
@pytest.mark.anyio
async def test_other_rsa_algorithms_with_a_key_without_alg(server, keys, alg):
    url = server.publish(f"/jwks-{next(_paths)}.json", {"keys": [public_jwk(keys["rsa"], "r")]})
    assert isinstance((await verify(make_settings({ISS: {"jwks_url": url}}), [sign(keys["rsa"], alg, "r")]))[0], dict)


@pytest.mark.anyio
async def test_keys_are_cached_and_aud_follows_the_path_called(issuer, keys, server):
    url, cfg = issuer
    feedback = PATH + "/feedback"
    tokens = [sign(keys["rsa"], "RS384", "rsa-1"), sign(keys["ec"], "ES384", "ec-1"),
              sign(keys["rsa"], "RS384", "rsa-1", claims(aud=BASE + feedback))]
    results = await verify(make_settings(cfg, public_base_url=BASE + "/"), tokens[:2]) + \
        await verify(make_settings(cfg), tokens[2:], path=feedback)
    assert all(isinstance(r, dict) for r in results)
    assert server.hits[url.removeprefix(server.base_url)] == 2  # once per verifier (process), not per token


@pytest.mark.anyio
async def test_inline_jwks_is_never_fetched(keys, server):
    before = sum(server.hits.values())
    settings = make_settings({ISS: {"jwks": {"keys": [public_jwk(keys["ec"], "ec-1", "ES384")]}}})
    assert isinstance((await verify(settings, [sign(keys["ec"], "ES384", "ec-1")]))[0], dict)
    assert sum(server.hits.values()) == before


@pytest.mark.anyio
async def test_expiry_within_leeway_is_accepted(issuer, keys):
    now = int(time.time())
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(exp=now - 30, iat=now - 200))
    assert isinstance((await verify(make_settings(issuer[1]), [token]))[0], dict)


# ---------------------------------------------------------------- rejections (issue 4)

@pytest.mark.anyio
async def test_no_authorization_or_not_bearer(issuer):
    settings = make_settings(issuer[1])
    assert rejected((await verify(settings, [None]))[0], "no Authorization")
    assert rejected((await verify(settings, ["not-a-jwt"]))[0], "not a compact JWT")


@pytest.mark.anyio
async def test_alg_none_is_rejected(issuer):
    token = forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "alg 'none' is not accepted")


@pytest.mark.anyio
async def test_hs256_signed_with_the_public_key_is_rejected(issuer, keys):
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    token = forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), secret=pem)
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "alg 'HS256' is not accepted")


@pytest.mark.anyio
async def test_alg_not_matching_the_key_is_rejected(issuer, keys):
    ec_for_rsa_kid = sign(keys["ec"], "ES384", "rsa-1")
    ps_for_rs384_key = sign(keys["rsa"], "PS384", "rsa-1")  # the JWK says alg RS384
    results = await verify(make_settings(issuer[1]), [ec_for_rsa_kid, ps_for_rs384_key])
    assert all(rejected(r, "does not match key") for r in results)


@pytest.mark.anyio
async def test_unknown_issuer_is_rejected(issuer, keys, server):
    url, cfg = issuer
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(iss="https://evil.example.org"))
    assert rejected((await verify(make_settings(cfg), [token]))[0], "is not trusted")
    assert server.hits[url.removeprefix(server.base_url)] == 0


@pytest.mark.anyio
async def test_bad_signature_is_rejected(issuer, keys):
    forged = sign(keys["attacker"], "RS384", "rsa-1")
    head, _, sig = sign(keys["rsa"], "RS384", "rsa-1").split(".")
    tampered = ".".join([head, b64(json.dumps(claims(jti="x")).encode()), sig])
    results = await verify(make_settings(issuer[1]), [forged, tampered])
    assert all(rejected(r, "signature rejected") for r in results)


@pytest.mark.anyio
async def test_wrong_aud_is_rejected(issuer, keys):
    settings = make_settings(issuer[1])
    wrong = sign(keys["rsa"], "RS384", "rsa-1", claims(aud=BASE + "/cds-services/other"))
    assert rejected((await verify(settings, [wrong]))[0], "aud")
    right_token_wrong_path = sign(keys["rsa"], "RS384", "rsa-1")
    assert rejected((await verify(settings, [right_token_wrong_path], path=PATH + "/feedback"))[0], "aud")
    no_aud = sign(keys["rsa"], "RS384", "rsa-1", claims(aud=None))
    assert rejected((await verify(settings, [no_aud]))[0], "aud")


@pytest.mark.anyio
async def test_aud_list_without_the_endpoint_is_rejected(issuer, keys):
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(aud=["https://cds.example.org" + PATH, BASE]))
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "aud")


@pytest.mark.anyio
async def test_expired_token_is_rejected(issuer, keys):
    now = int(time.time())
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(exp=now - 120, iat=now - 400))
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "expired")


@pytest.mark.anyio
async def test_iat_in_the_future_is_rejected(issuer, keys):
    now = int(time.time())
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(iat=now + 300, exp=now + 600))
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "iat")


@pytest.mark.anyio
async def test_missing_exp_or_iat_and_overlong_lifetime_are_rejected(issuer, keys):
    now = int(time.time())
    tokens = [sign(keys["rsa"], "RS384", "rsa-1", claims(exp=None)),
              sign(keys["rsa"], "RS384", "rsa-1", claims(iat=None)),
              sign(keys["rsa"], "RS384", "rsa-1", claims(exp=now + 86400))]
    a, b, c = await verify(make_settings(issuer[1]), tokens)
    assert rejected(a, "claim exp") and rejected(b, "claim iat") and rejected(c, "more than 3600")


@pytest.mark.anyio
async def test_missing_jti_is_rejected(issuer, keys):
    token = sign(keys["rsa"], "RS384", "rsa-1", claims(jti=None))
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "jti missing")


@pytest.mark.anyio
async def test_replayed_jti_is_rejected(issuer, keys, server):
    token = sign(keys["rsa"], "RS384", "rsa-1")
    first, again = await verify(make_settings(issuer[1]), [token, token])
    assert isinstance(first, dict) and rejected(again, "jti replayed")


@pytest.mark.anyio
async def test_same_jti_from_two_issuers_is_not_a_replay(issuer, keys):
    url, cfg = issuer
    cfg = {**cfg, "https://other-ehr.example.org": {"jwks_url": url}}
    a = sign(keys["rsa"], "RS384", "rsa-1", claims(jti="same"))
    b = sign(keys["rsa"], "RS384", "rsa-1", claims(jti="same", iss="https://other-ehr.example.org"))
    assert all(isinstance(r, dict) for r in await verify(make_settings(cfg), [a, b]))


@pytest.mark.anyio
async def test_replay_cache_forgets_after_expiry():
    now = [1000.0]
    cache = MemoryReplayCache(lambda: now[0])
    assert isinstance(cache, ReplayCache)

    first = await cache.claim("k", 1010.0)
    again = await cache.claim("k", 1010.0)
    now[0] = 1011.0
    assert [first, again, await cache.claim("k", 1020.0)] == [True, False, True]


@pytest.mark.anyio
async def test_tenant_must_be_allowed_when_the_issuer_lists_tenants(issuer, keys):
    url, _ = issuer
    settings = make_settings({ISS: {"jwks_url": url, "tenants": ["clinic-a"]}})
    tokens = [sign(keys["rsa"], "RS384", "rsa-1", claims(tenant="clinic-a")),
              sign(keys["rsa"], "RS384", "rsa-1", claims(tenant="clinic-b")),
              sign(keys["rsa"], "RS384", "rsa-1")]
    ok, other, missing = await verify(settings, tokens)
    assert ok["tenant"] == "clinic-a"
    assert rejected(other, "tenant") and rejected(missing, "tenant")


@pytest.mark.parametrize("typ", [None, "at+jwt", "JWS"])
@pytest.mark.anyio
async def test_missing_or_wrong_typ_is_rejected(issuer, keys, typ):
    token = sign(keys["rsa"], "RS384", "rsa-1", typ=typ)
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "typ")


@pytest.mark.anyio
async def test_typ_is_compared_case_insensitively(issuer, keys):
    """RFC 7519 section 5.1: `typ` values are compared case-insensitively ("JWT" is only recommended)."""
    token = sign(keys["rsa"], "RS384", "rsa-1", typ="jwt")
    assert isinstance((await verify(make_settings(issuer[1]), [token]))[0], dict)


@pytest.mark.anyio
async def test_missing_kid_is_rejected(issuer, keys):
    token = sign(keys["rsa"], "RS384", None)
    assert "kid" not in jwt.get_unverified_header(token)
    assert rejected((await verify(make_settings(issuer[1]), [token]))[0], "no usable kid")


@pytest.mark.anyio
async def test_kid_not_in_jwks_is_rejected_even_if_another_key_would_verify(issuer, keys, server):
    url, cfg = issuer
    token = sign(keys["rsa"], "RS384", "rsa-other")  # same key material as rsa-1, other kid
    assert rejected((await verify(make_settings(cfg), [token]))[0], "kid 'rsa-other' is not in the JWKS")
    assert server.hits[url.removeprefix(server.base_url)] == 1  # fetched just now: no second fetch


@pytest.mark.anyio
async def test_jku_not_on_the_list_is_never_fetched(issuer, keys, server):
    url, cfg = issuer
    evil = server.publish(f"/evil-{next(_paths)}.json",
                          {"keys": [public_jwk(keys["attacker"], "a", "RS384")]})
    token = sign(keys["attacker"], "RS384", "a", jku=evil)
    assert rejected((await verify(make_settings(cfg), [token]))[0], "is not on the list")
    assert server.hits[evil.removeprefix(server.base_url)] == 0
    assert server.hits[url.removeprefix(server.base_url)] <= 1  # the issuer's configured keys: kid 'a' is not there


@pytest.mark.anyio
async def test_jku_on_the_list_is_used(issuer, keys, server):
    url, _ = issuer
    listed = server.publish(f"/listed-{next(_paths)}.json",
                            {"keys": [public_jwk(keys["ec"], "ec-9", "ES384")]})
    settings = make_settings({ISS: {"jwks_url": url, "jku": [listed]}})
    [result] = await verify(settings, [sign(keys["ec"], "ES384", "ec-9", jku=listed)])
    assert isinstance(result, dict)
    assert server.hits[listed.removeprefix(server.base_url)] == 1
    assert server.hits[url.removeprefix(server.base_url)] == 0


@pytest.mark.anyio
async def test_jku_only_issuer_rejects_a_token_without_jku(keys, server):
    listed = server.publish(f"/listed-{next(_paths)}.json", {"keys": [public_jwk(keys["ec"], "ec-1")]})
    settings = make_settings({ISS: {"jku": [listed]}})
    assert rejected((await verify(settings, [sign(keys["ec"], "ES384", "ec-1")]))[0], "only trusts listed jku")


@pytest.mark.anyio
async def test_unknown_kid_refetches_once_per_interval(issuer, keys, server):
    url, cfg = issuer
    path = url.removeprefix(server.base_url)
    now = [time.time()]
    rotated = {"keys": [public_jwk(keys["rsa"], "rsa-1", "RS384"), public_jwk(keys["ec"], "ec-new", "ES384")]}

    def step(i: int) -> None:
        if i == 3:  # the EHR rotates in a new key, and the refresh interval passes
            server.publish(path, rotated)
            now[0] += 31
    tokens = [sign(keys["rsa"], "RS384", "rsa-1"), sign(keys["ec"], "ES384", "ec-new"),
              sign(keys["ec"], "ES384", "ec-other"), sign(keys["ec"], "ES384", "ec-new")]
    hits = []
    results = await verify(make_settings(cfg), tokens, clock=lambda: now[0],
                  between=lambda i: (hits.append(server.hits[path]), step(i)))
    assert isinstance(results[0], dict)
    assert rejected(results[1], "not in the JWKS") and rejected(results[2], "not in the JWKS")
    assert hits == [0, 1, 2, 2]  # initial fetch, one refetch for ec-new, none for ec-other within 30 s
    assert isinstance(results[3], dict) and server.hits[path] == 3


@pytest.mark.anyio
async def test_unreachable_jwks_is_not_hammered(keys, server):
    missing = server.url(f"/missing-{next(_paths)}.json")
    token = sign(keys["rsa"], "RS384", "rsa-1")
    results = await verify(make_settings({ISS: {"jwks_url": missing}}), [token, sign(keys["rsa"], "RS384", "rsa-1")])
    assert all(rejected(r, "unavailable") for r in results)
    assert server.hits[missing.removeprefix(server.base_url)] == 1


# ---------------------------------------------------------------- configuration

def test_parse_trusted_issuers_inline_json():
    issuers = parse_trusted_issuers(json.dumps({ISS: {"jwks_url": "https://ehr.example.org/jwks.json",
                                                      "jku": ["https://ehr.example.org/k2.json"],
                                                      "tenants": ["a", "b"]}}))
    cfg = issuers[ISS]
    assert cfg.jwks_url == "https://ehr.example.org/jwks.json"
    assert cfg.jku == ("https://ehr.example.org/k2.json",) and cfg.tenants == ("a", "b") and cfg.jwks is None
    assert parse_trusted_issuers(None) == {} and parse_trusted_issuers("  ") == {}
    one = parse_trusted_issuers('{"x": {"jku": "https://x/k.json", "tenants": "a"}}')["x"]  # a string: a list of one
    assert one.jku == ("https://x/k.json",) and one.tenants == ("a",)


def test_parse_trusted_issuers_yaml_and_json_files(tmp_path, keys):
    jwk = public_jwk(keys["ec"], "ec-1", "ES384")
    yml = tmp_path / "issuers.yaml"
    yml.write_text(f"{ISS}:\n  jwks_url: https://ehr.example.org/jwks.json\n  tenants: [clinic-a]\n"
                   f"https://inline.example.org:\n  jwks:\n    keys:\n      - {json.dumps(jwk)}\n")
    issuers = parse_trusted_issuers(str(yml))
    assert issuers[ISS].tenants == ("clinic-a",)
    assert list(issuers["https://inline.example.org"].jwks) == ["ec-1"]
    js = tmp_path / "issuers.json"
    js.write_text(json.dumps({ISS: {"jwks_url": "https://ehr.example.org/jwks.json"}}))
    assert list(parse_trusted_issuers(str(js))) == [ISS]


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "invalid inline JSON"),
    ("[1, 2]", "neither inline JSON"),
    ("/nonexistent/issuers.yaml", "neither inline JSON"),
    ('{"x": "https://x/jwks"}', "expected an object"),
    ('{"x": {"jwks_uri": "https://x/jwks"}}', "unknown field"),
    ('{"x": {"tenants": ["a"]}}', "needs a jwks_url"),
    ('{"x": {"jwks_url": "ftp://x/jwks"}}', "http(s) URL"),
    ('{"x": {"jwks_url": "https://x/jwks", "jku": [1]}}', "list of strings"),
    ('{"x": {"jwks_url": "https://x/jwks", "jwks": {"keys": []}}}', "not both"),
    ('{"x": {"jwks": {"keys": []}}}', "no usable"),
    ('{"x": {"jwks": []}}', '"keys" array'),
    ('{"x": {"jwks_url": "https://x/jwks", "tenants": [""]}}', "tenants must be a string or a list of strings"),
    ('{"x": {"jwks_url": "https://x/jwks", "jku": "ftp://x/k"}}', "jku must be a string or a list of strings, each"),
    ('{"": {"jwks_url": "https://x/jwks"}}', "non-empty string"),
])
def test_parse_trusted_issuers_rejects_bad_config(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_trusted_issuers(value)


def good_prod(**changes: Any) -> Settings:
    values = {"public_base_url": "https://cds.example.org",
              "allowed_fhir_servers": ["https://fhir.example.org/r4"]}
    return make_settings({ISS: {"jwks_url": "https://ehr.example.org/jwks.json"}}, **{**values, **changes})


def test_check_production_settings_accepts_a_complete_config():
    assert check_production_settings(good_prod()) == []
    loopback = make_settings({ISS: {"jwks_url": "http://localhost:9000/jwks", "jku": ["http://[::1]:9/k"]}},
                             public_base_url="http://127.0.0.2:8080",
                             allowed_fhir_servers=["http://127.0.0.1:8103/fhir"])
    assert check_production_settings(loopback) == []
    assert check_production_settings(Settings(env="dev", require_jwt=False)) == []


def test_check_production_settings_lists_every_problem():
    bare = Settings(env="prod", public_base_url=None, trusted_issuers=None, pseudonym_key=None,
                    allowed_fhir_servers=[])
    problems = " | ".join(check_production_settings(bare))
    for name in ("CDS_TRUSTED_ISSUERS", "CDS_PUBLIC_BASE_URL", "CDS_PSEUDONYM_KEY"):
        assert name in problems
    assert "CDS_REQUIRE_JWT" in " ".join(check_production_settings(good_prod(require_jwt=False)))
    invalid = check_production_settings(good_prod(trusted_issuers="{"))
    assert "CDS_TRUSTED_ISSUERS is invalid" in " ".join(invalid)


@pytest.mark.parametrize("changes", [
    {"public_base_url": "http://cds.example.org"},
    {"allowed_fhir_servers": ["http://fhir.example.org/r4"]},
    {"trusted_issuers": json.dumps({ISS: {"jwks_url": "http://ehr.example.org/jwks.json"}})},
    {"trusted_issuers": json.dumps({ISS: {"jku": ["http://127.0.0.1.evil.org/jwks.json"]}})},
])
def test_check_production_settings_requires_https_off_loopback(changes):
    problems = check_production_settings(good_prod(**changes))
    assert len(problems) == 1 and "https" in problems[0]


# ---------------------------------------------------------------- pseudonyms and logs

def test_pseudonym_is_keyed_and_stable():
    a = pseudonym("patient-123", b"k1")
    assert a == pseudonym("patient-123", b"k1") and len(a) == 16 and int(a, 16) >= 0
    assert a != pseudonym("patient-123", b"k2") and a != pseudonym("patient-124", b"k1")
    assert pseudonym_key(good_prod()) == b"k"
    dev = Settings(env="dev", pseudonym_key=None)
    assert len(pseudonym_key(dev)) == 32 and pseudonym_key(dev) == pseudonym_key(dev)


def test_logs_redact_tokens_and_carry_extra_fields(keys):
    token = sign(keys["rsa"], "RS384", "rsa-1")
    assert token not in redact(f"Authorization: Bearer {token}")
    assert redact("saw eyJhbGciOi.eyJpc3Mi.c2ln here") == "saw [REDACTED] here"
    assert redact('{"access_token": "abc123", "x": 1}') == '{"access_token": "[REDACTED]", "x": 1}'
    record = logging.LogRecord("cds", logging.WARNING, __file__, 1, "header was %s",
                               (f"Bearer {token}",), None)
    record.hookInstance = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
    record.note = f"jwt {token}"
    assert RedactFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "header was Bearer [REDACTED]" and line["level"] == "WARNING"
    assert line["logger"] == "cds" and line["hookInstance"].startswith("d1577c69") and "time" in line
    assert token not in json.dumps(line) and line["note"] == "jwt [REDACTED]"


def test_log_times_are_written_as_datetime_writes_them():
    formatter = JsonFormatter()
    edges = [s + f for s in (1_795_000_000, 1_795_000_001) for f in (0.0, 0.0004999, 0.0005, 0.9994999, 0.9995,
                                                                     0.9999994, 0.9999995, 0.9999996)]
    spread = [1_700_000_000 + i * 3_141.592653589 + i / 7 for i in range(20_000)]
    for created in sorted(edges + spread):  # the per-second cache is hit and missed in both orders
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert formatter.timestamp(created) == expected, created
    for created in sorted(edges + spread, reverse=True):
        assert formatter.timestamp(created) == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


@pytest.mark.anyio
async def test_absurd_claim_values_are_rejected_not_crashing(issuer, keys):
    tokens = [sign(keys["rsa"], "RS384", "rsa-1", claims(exp=10**400)),
              sign(keys["rsa"], "RS384", "rsa-1", claims(exp="soon")),
              sign(keys["rsa"], "RS384", "rsa-1", claims(iat=True)),
              sign(keys["rsa"], "RS384", "rsa-1", claims(aud={"x": 1}, tenant=["a"])),
              "eyJhbGciOiJSUzM4NCJ9.bm90IGpzb24.c2ln"]
    results = await verify(make_settings(issuer[1]), tokens)
    assert all(isinstance(r, str) for r in results), results


@pytest.mark.anyio
async def test_concurrent_cold_start_fetches_the_jwks_once(issuer, keys, server):
    url, cfg = issuer
    tokens = [sign(keys["ec"], "ES384", "ec-1") for _ in range(20)]

    async with httpx.AsyncClient() as http:
        verifier = ClientVerifier(make_settings(cfg), http, MemoryReplayCache())
        results = await asyncio.gather(*(verifier.verify(f"Bearer {t}", PATH) for t in tokens))
    assert all(isinstance(r, dict) for r in results)
    assert server.hits[url.removeprefix(server.base_url)] == 1


@pytest.mark.anyio
async def test_the_token_never_reaches_the_log(issuer, keys, caplog):
    caplog.set_level(logging.DEBUG)
    good, bad = sign(keys["rsa"], "RS384", "rsa-1"), sign(keys["attacker"], "RS384", "rsa-1")
    await verify(make_settings(issuer[1]), [good, bad, good])
    assert "JWKS fetched" in caplog.text
    assert good not in caplog.text and bad not in caplog.text and "eyJ" not in caplog.text
