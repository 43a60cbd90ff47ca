"""A tiny JWKS server on 127.0.0.1 for the trust tests: serves JSON by path and counts the fetches."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JwksServer:
    """`with JwksServer() as s: s.publish("/jwks.json", {...}); s.url("/jwks.json"); s.hits["/jwks.json"]`."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    doc = server.documents.get(self.path)
                body = json.dumps(doc).encode() if doc is not None else b'{"error": "not found"}'
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def publish(self, path: str, document: Any) -> str:
        """Serve `document` as JSON at `path`; return its URL."""
        with self._lock:
            self.documents[path] = document
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
