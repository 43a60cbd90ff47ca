"""Issue 4 end to end: the real service in production mode, an EHR signing tokens with its own keys from a JWKS
served on loopback, and a FHIR server allow-list that keeps foreign servers uncontacted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Service, free_port, load_fixture
from fhirserver import FhirServer, RecordingServer
from jwks_server import JwksServer, rsa_jwk
from scenarios import topics

ISSUER = "https://ehr.example.org"
SERVICE = "/cds-services/mesotherapy-contraindications"
PATIENT_ID = "pat-1288992"


class Ehr:
    """An EHR-style client with an RS384 and an ES384 key."""

    def __init__(self, jwks: JwksServer) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.jwks_url = jwks.publish("/jwks.json", {"keys": [
            rsa_jwk(self.rsa.public_key(), "rsa-1"),
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec-1", "alg": "ES384"},
        ]})

    def token(self, aud: str, *, alg: str = "RS384", kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, **claims}
        key = self.rsa if alg.startswith("RS") else self.ec
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid or ("rsa-1" if key is self.rsa else "ec-1"),
                                                                  "typ": "JWT"})


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture(scope="module")
def ehr(jwks: JwksServer) -> Ehr:
    return Ehr(jwks)


@pytest.fixture(scope="module")
def prod(ehr: Ehr, fhir_server: FhirServer) -> Iterator[Service]:
    svc = Service()
    svc.env.update({
        "CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": svc.base_url, "CDS_PSEUDONYM_KEY": "test-pseudonym-key",
        "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": ehr.jwks_url}}),
        "CDS_ALLOWED_FHIR_SERVERS": json.dumps([fhir_server.base_url]), "CDS_LOG_LEVEL": "DEBUG",
    })
    svc.start()
    yield svc
    svc.logs = svc.stop()  # type: ignore[attr-defined]


def call(svc: Service, path: str, token: str | None, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = svc.base_url + path
    if body is None:
        return httpx.get(url, headers=headers, timeout=10)
    return httpx.post(url, json=body, headers=headers, timeout=10)


def hook_request() -> dict[str, Any]:
    return load_fixture("requests/order-select-example.json")


def test_valid_tokens_pass_on_every_endpoint(prod: Service, ehr: Ehr) -> None:
    assert call(prod, "/cds-services", ehr.token(prod.base_url + "/cds-services")).status_code == 200
    answer = call(prod, SERVICE, ehr.token(prod.base_url + SERVICE, alg="ES384"), hook_request())
    assert answer.status_code == 200
    card = answer.json()["cards"][0]
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                              "overrideReason": {"reason": card["overrideReasons"][0]},
                              "outcomeTimestamp": "2026-11-21T10:00:00Z"}]}
    path = SERVICE + "/feedback"
    assert call(prod, path, ehr.token([prod.base_url + path, "https://other"]), feedback).status_code == 200


def forge(alg: str, aud: str, secret: bytes | None = None) -> str:
    """A token built by hand: `alg: none`, or HMAC signed with `secret` (algorithm confusion)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    now = int(time.time())
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 300,
                              "jti": uuid.uuid4().hex}).encode())
    signature = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()) if secret else ""
    return f"{header}.{payload}.{signature}"


def public_pem(ehr: Ehr) -> bytes:
    return ehr.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


BAD_TOKENS = {
    "missing": lambda e, aud: None,
    "alg-none": lambda e, aud: forge("none", aud),
    "hs256-with-public-key": lambda e, aud: forge("HS256", aud, public_pem(e)),
    "expired": lambda e, aud: e.token(aud, exp=int(time.time()) - 600, iat=int(time.time()) - 900),
    "issued-in-future": lambda e, aud: e.token(aud, iat=int(time.time()) + 600, exp=int(time.time()) + 900),
    "wrong-audience": lambda e, aud: e.token(aud + "/feedback"),
    "unknown-issuer": lambda e, aud: e.token(aud, iss="https://evil.example"),
    "unknown-kid": lambda e, aud: e.token(aud, kid="rsa-2"),
    "wrong-key-for-kid": lambda e, aud: e.token(aud, alg="ES384", kid="rsa-1"),
    "no-jti": lambda e, aud: e.token(aud, jti=None),
    "bad-signature": lambda e, aud: e.token(aud)[:-6] + "AAAAAA",
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
@pytest.mark.parametrize("path", ["/cds-services", SERVICE, SERVICE + "/feedback"])
def test_bad_tokens_get_401_that_says_nothing(prod: Service, ehr: Ehr, name: str, path: str) -> None:
    token = BAD_TOKENS[name](ehr, prod.base_url + path)
    body = None if path == "/cds-services" else {"feedback": []} if path.endswith("feedback") else hook_request()
    response = call(prod, path, token, body)
    assert response.status_code == 401
    assert response.json()["issue"][0]["diagnostics"] == "authentication required"


def test_replayed_token_is_rejected(prod: Service, ehr: Ehr) -> None:
    token = ehr.token(prod.base_url + SERVICE)
    assert call(prod, SERVICE, token, hook_request()).status_code == 200
    assert call(prod, SERVICE, token, hook_request()).status_code == 401


def test_foreign_fhir_server_is_never_contacted(prod: Service, ehr: Ehr) -> None:
    request = hook_request()
    del request["prefetch"]["allergies"]
    with RecordingServer() as foreign:
        request["fhirServer"] = foreign.base_url
        request["fhirAuthorization"] = {"access_token": "secret-ehr-token", "token_type": "Bearer",
                                        "expires_in": 300, "scope": "patient/*.read", "subject": "meso"}
        response = call(prod, SERVICE, ehr.token(prod.base_url + SERVICE), request)
        assert foreign.requests == []
    assert response.status_code == 200
    assert topics(response)["screening-incomplete"] == "warning"
    assert "allow-list" in next(c["detail"] for c in response.json()["cards"]
                                if c["source"]["topic"]["code"] == "screening-incomplete")


def test_allowed_fhir_server_is_used(prod: Service, ehr: Ehr, fhir_server: FhirServer) -> None:
    fhir_server.reset()
    fhir_server.load(load_fixture("fhir/patient-fetch.json"))
    request = load_fixture("fhir/order-select-no-prefetch.json")
    request["fhirServer"] = fhir_server.base_url
    request["fhirAuthorization"] = {"access_token": "fhir-test-token", "token_type": "Bearer", "expires_in": 300,
                                    "scope": "patient/*.read", "subject": "meso"}
    response = call(prod, SERVICE, ehr.token(prod.base_url + SERVICE), request)
    assert topics(response)["pregnancy"] == "critical"


def test_logs_hold_no_tokens_or_patient_ids(prod: Service, ehr: Ehr) -> None:
    token = ehr.token(prod.base_url + SERVICE)
    request = hook_request()
    request["fhirServer"] = "https://ehr.example.org/fhir"
    request["fhirAuthorization"] = {"access_token": "very-secret-access-token", "token_type": "Bearer"}
    assert call(prod, SERVICE, token, request).status_code == 200
    call(prod, SERVICE, token, request)  # a replay, logged as a rejection
    logs = prod.stop()
    prod.start()  # the module's other tests keep a running service
    assert "hook answered" in logs and "client JWT rejected" in logs  # DEBUG: every line is redacted too
    for secret in (token, "very-secret-access-token", PATIENT_ID):
        assert secret not in logs


def test_database_outage_does_not_stop_cards_in_production(ehr: Ehr) -> None:
    svc = Service()
    svc.env.update({"CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": svc.base_url, "CDS_PSEUDONYM_KEY": "k",
                    "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": ehr.jwks_url}}),
                    "CDS_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    with svc:
        token = ehr.token(svc.base_url + SERVICE)
        answer = call(svc, SERVICE, token, hook_request())
        assert answer.status_code == 200 and answer.json()["cards"]
        assert call(svc, SERVICE, token, hook_request()).status_code == 401  # replay still refused here
        metrics = httpx.get(svc.base_url + "/metrics").text
    assert 'cds_store_errors_total{operation="claim_jti"}' in metrics


@pytest.mark.parametrize("missing", ["CDS_TRUSTED_ISSUERS", "CDS_PUBLIC_BASE_URL", "CDS_PSEUDONYM_KEY"])
def test_production_refuses_to_start_unconfigured(ehr: Ehr, missing: str) -> None:
    svc = Service({"CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": "https://cds.example.org",
                   "CDS_PSEUDONYM_KEY": "k", "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": ehr.jwks_url}})})
    del svc.env[missing]
    with pytest.raises(RuntimeError, match="refusing to start"):
        svc.start()


def test_production_refuses_plain_http_urls(ehr: Ehr) -> None:
    svc = Service({"CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": "http://cds.example.org", "CDS_PSEUDONYM_KEY": "k",
                   "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": ehr.jwks_url}})})
    with pytest.raises(RuntimeError, match="https"):
        svc.start()


def test_cors_is_off_by_default_and_opens_for_named_origins(service: Service) -> None:
    preflight = {"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = httpx.options(service.base_url + SERVICE, headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    with Service({"CDS_ENV": "dev", "CDS_CORS_ORIGINS": "https://sandbox.cds-hooks.org"}) as svc:
        opened = httpx.options(svc.base_url + SERVICE, headers=preflight)
        assert opened.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
        assert "authorization" in opened.headers["access-control-allow-headers"].lower()
        # with CORS on, hooks go through the router and its middleware (not the fast path): same cards, with CORS
        request = load_fixture("requests/order-select-example.json")
        request["context"]["patientId"] = f"cors-{uuid.uuid4().hex[:12]}"  # no card answered on the shared service
        via_router = httpx.post(svc.base_url + SERVICE, json=request, headers={"Origin": preflight["Origin"]})
        assert via_router.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
        fast = httpx.post(service.base_url + SERVICE, json=request, headers={"Origin": preflight["Origin"]})
        assert "access-control-allow-origin" not in fast.headers
        assert topics(via_router) == topics(fast) == {"pregnancy": "critical", "allergy-history": "warning"}
        bad = httpx.post(svc.base_url + SERVICE, content=b"{", headers={"Origin": preflight["Origin"]})
        assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("case", ["listed", "unlisted-known-kid", "unlisted-unknown-kid"])
def test_jku_header(ehr: Ehr, jwks: JwksServer, case: str) -> None:
    """The reference sandbox names its public JWKS in `jku`: a jku not on the issuer's list is never fetched; the
    token is verified with the issuer's configured keys when its kid is among them, else 401."""
    listed = jwks.publish(f"/listed-{case}.json", {"keys": [
        rsa_jwk(ehr.rsa.public_key(), "rsa-1")]})
    unlisted = jwks.publish(f"/unlisted-{case}.json", {"keys": [
        rsa_jwk(ehr.rsa.public_key(), "rsa-9")]})
    svc = Service()
    svc.env.update({"CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": svc.base_url, "CDS_PSEUDONYM_KEY": "k",
                    "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": ehr.jwks_url, "jku": [listed]}})})
    now = int(time.time())
    with svc:
        aud = svc.base_url + SERVICE

        def token(jku: str, kid: str) -> str:
            return jwt.encode({"iss": ISSUER, "aud": aud, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex},
                              ehr.rsa, algorithm="RS384", headers={"kid": kid, "typ": "JWT", "jku": jku})

        if case == "listed":
            answer = call(svc, SERVICE, token(listed, "rsa-1"), hook_request())
            assert answer.status_code == 200 and answer.json()["cards"]
            assert jwks.hits[listed.removeprefix(jwks.url(""))] == 1
        elif case == "unlisted-known-kid":  # rsa-1 is in the issuer's configured jwks_url
            answer = call(svc, SERVICE, token(unlisted, "rsa-1"), hook_request())
            assert answer.status_code == 200 and answer.json()["cards"]
        else:  # rsa-9 is only at the unlisted URL, which must not be trusted or fetched
            answer = call(svc, SERVICE, token(unlisted, "rsa-9"), hook_request())
            assert answer.status_code == 401
            assert answer.json()["issue"][0]["diagnostics"] == "authentication required"
        assert jwks.hits[unlisted.removeprefix(jwks.url(""))] == 0
