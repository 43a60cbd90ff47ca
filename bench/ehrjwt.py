"""The JWT workload's EHR: a signing key, its JWKS on a local HTTP server, and a JWT of its own for every request.

Outside dev mode the service verifies every hook call's JWT (CDS Hooks "Trusting CDS Clients") and claims its
`jti` in the replay cache, so this is what production pays and the other workloads do not. Tokens are ES384 (the
verification costs more than RS384's: bench/README.md), signed before the measurement starts so that the load
generator does no signing while it measures.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import loadgen
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://ehr.bench.example"
ALG = "ES384"
KID = "bench-1"


class Ehr:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        document = json.dumps({"keys": [{**public, "kid": KID, "alg": ALG}]}).encode()

        class Jwks(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.jwks_url = f"http://127.0.0.1:{self._server.server_port}/jwks.json"

    def settings(self, port: int) -> dict[str, str]:
        """The service's environment: JWTs required, this EHR trusted, its own URL as the audience's base."""
        return {"CDS_REQUIRE_JWT": "true", "CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
                "CDS_TRUSTED_ISSUERS": json.dumps({ISSUER: {"jwks_url": self.jwks_url}})}

    def token(self, port: int, path: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": f"http://127.0.0.1:{port}{path}", "iat": now, "exp": now + 280,
                  "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm=ALG, headers={"kid": KID, "typ": "JWT"})

    def requests(self, port: int, path: str, body: bytes, count: int) -> Callable[[], bytes]:
        """`count` requests to the service on `port`, each with a JWT of its own, signed now; StopIteration after."""
        tokens = iter([self.token(port, path) for _ in range(count)])
        return lambda: loadgen.build_request("127.0.0.1", port, path, body, next(tokens))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
