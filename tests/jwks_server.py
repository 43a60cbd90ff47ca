"""A JWKS server on 127.0.0.1 for the trust tests: pytest-httpserver serving JSON by path, counting the fetches.

A thin layer over `pytest_httpserver.HTTPServer` (werkzeug): a document can be replaced at its path (a key
rotation), an unpublished path answers 404, and `hits` counts the requests per path from the server's own log.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import jwt
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response


class JwksServer:
    """`with JwksServer() as s: s.publish("/jwks.json", {...}); s.url("/jwks.json"); s.hits["/jwks.json"]`."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._server = HTTPServer(host="127.0.0.1", port=0)
        self._server.no_handler_status_code = 404

    @property
    def base_url(self) -> str:
        return self._server.url_for("/").rstrip("/")

    @property
    def hits(self) -> Counter[str]:
        return Counter(request.path for request, _ in self._server.log)

    def publish(self, path: str, document: Any) -> str:
        """Serve `document` as JSON at `path` (replacing what was there); return its URL."""
        with self._lock:
            new = path not in self.documents
            self.documents[path] = document
        if new:
            self._server.expect_request(path, method="GET").respond_with_handler(self._answer)
        return self.url(path)

    def _answer(self, request: Request) -> Response:
        with self._lock:
            document = self.documents[request.path]
        return Response(json.dumps(document), content_type="application/json")

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> JwksServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.clear()
        self._server.stop()


def rsa_jwk(public_key: Any, kid: str, alg: str = "RS384") -> dict[str, Any]:
    """The public JWK of an RSA key, as an EHR publishes it in its JWKS."""
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key)), "kid": kid, "alg": alg}
