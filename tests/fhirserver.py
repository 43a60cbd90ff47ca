"""Real FHIR server for the integration tests, plus a "foreign origin" recorder.

Plain helpers, no pytest fixtures: conftest wraps them.

* ``ensure_installed()`` installs the pinned npm packages of ``tests/fhir_server`` once.
* ``FhirServer`` runs ``tests/fhir_server/server.mjs`` (Medplum FhirRouter + MemoryRepository, FHIR R4)
  on 127.0.0.1 with a free port and drives its ``/__admin/*`` endpoints.
* ``RecordingServer`` is a tiny HTTP server on another port that records every request: point a ``next``
  link at it (``FhirServer.configure(next_link_base=rec.base_url)``) and assert it was never contacted.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
_INSTALL_MARKER = SERVER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "mesotherapy-cds-fhir-server-npm.lock"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"`{tool}` was not found on PATH. The FHIR integration tests need Node.js >= 20 and npm "
            f"(they run {SERVER_SCRIPT.relative_to(SERVER_DIR.parent.parent)})."
        )
    return path


def ensure_installed(timeout: float = 300.0) -> None:
    """Install tests/fhir_server/node_modules from package-lock.json if it is missing.

    Runs ``npm ci``, falling back to ``npm install`` if that fails. Safe to call from several
    processes at once (pytest-xdist): the install is serialised with a file lock.
    """
    _require("node")
    npm = _require("npm")
    if _INSTALL_MARKER.exists():
        return
    with _file_lock(_INSTALL_LOCK):
        if _INSTALL_MARKER.exists():  # another process installed it while we waited
            return
        errors = []
        for args in (["ci"], ["install"]):
            proc = subprocess.run(
                [npm, *args, "--no-audit", "--no-fund"],
                cwd=SERVER_DIR,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode == 0 and _INSTALL_MARKER.exists():
                return
            errors.append(f"$ npm {args[0]} (exit {proc.returncode})\n{proc.stderr.strip()[-2000:]}")
        details = "\n".join(errors)
        raise RuntimeError(f"npm could not install the test FHIR server in {SERVER_DIR}:\n{details}")


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, best effort
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class FhirServer:
    """``node server.mjs`` on 127.0.0.1:<free port>; use as a context manager.

    ``token``: if set, every FHIR request must carry ``Authorization: Bearer <token>`` (else 401).
    ``page_size``: default page size of searches without ``_count`` (0 = no paging).
    """

    def __init__(self, token: str | None = None, page_size: int = 0, startup_timeout: float = 20.0) -> None:
        self.token = token
        self.page_size = page_size
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: list[str] = []
        self._admin: httpx.Client | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FhirServer is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FhirServer:
        if self._proc is not None:
            return self
        ensure_installed()
        env = {**os.environ, "PORT": "0", "PAGE_SIZE": str(self.page_size), "EXIT_ON_STDIN_CLOSE": "1"}
        env.pop("FHIR_TOKEN", None)
        if self.token:
            env["FHIR_TOKEN"] = self.token
        started = time.monotonic()
        # stdin is a pipe nobody writes to: if this Python process dies, the pipe closes and node exits.
        self._proc = subprocess.Popen(
            [_require("node"), str(SERVER_SCRIPT)],
            cwd=SERVER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc.stdout, lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self._proc.stderr, None), daemon=True).start()
        deadline = started + self.startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                message = f"FHIR server did not start within {self.startup_timeout} s{self._stderr_tail()}"
                raise RuntimeError(message) from None
            if line is None:  # stdout closed: the process died
                code = self._proc.wait()
                self._proc = None
                raise RuntimeError(f"FHIR server exited with code {code} during startup{self._stderr_tail()}")
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                break
        self.startup_seconds = time.monotonic() - started
        self._admin = httpx.Client(base_url=self.base_url, timeout=10.0)
        return self

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        proc, self._proc = self._proc, None
        self.port = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pump(self, stream, sink: queue.Queue[str | None] | None) -> None:
        with contextlib.suppress(ValueError, OSError):  # stream closed under us by stop()
            for line in stream:
                if sink is not None:
                    sink.put(line.strip())
                else:
                    self._stderr.append(line.rstrip("\n"))
                    del self._stderr[:-200]
        if sink is not None:
            sink.put(None)

    def _stderr_tail(self) -> str:
        tail = "\n".join(self._stderr[-40:])
        return f"; stderr:\n{tail}" if tail else ""

    # -- admin API (no token needed) -----------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        if self._admin is None:
            raise RuntimeError("FhirServer is not running")
        content = None if payload is None else json.dumps(payload)
        headers = {"Content-Type": "application/json"}
        response = self._admin.request(method, path, content=content, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def load(self, bundle_or_resource: dict[str, Any]) -> dict[str, Any]:
        """Store a transaction/batch/collection Bundle's resources, or one resource, keeping their ids.

        Entries without an id get their ``urn:uuid:`` fullUrl's uuid, and references to such fullUrls are
        rewritten to ``Type/id``. Returns ``{"loaded": n, "ids": ["Patient/pat-1", ...]}``.
        """
        return self._call("POST", "/__admin/load", bundle_or_resource)

    def reset(self) -> None:
        """Empty the repository and the request log, and restore the startup config."""
        self._call("POST", "/__admin/reset")

    def requests(self) -> list[dict[str, Any]]:
        """FHIR requests received since the last reset, oldest first.

        Each is ``{"method", "path" (with query), "has_authorization", "authorization" (exact value or None),
        "time" (epoch seconds)}``. Admin calls are not recorded.
        """
        return self._call("GET", "/__admin/requests")

    def configure(self, **config: Any) -> dict[str, Any]:
        """Change behaviour until the next ``reset()``; returns the full config now in force.

        ``delay_ms=int`` delays every FHIR response; ``fail={"Condition": 500}`` makes every request on that
        type answer that status with an OperationOutcome; ``page_size=int`` overrides the default page size;
        ``next_link_base="http://host:port"`` makes ``next`` links point at that origin. ``None`` restores a
        key's default. Keys not passed keep their current value.
        """
        return self._call("POST", "/__admin/config", config)


class RecordingServer:
    """HTTP server on 127.0.0.1:<free port> that records every request and answers GETs with an empty
    searchset Bundle (other methods: 405). Use as a context manager; inspect ``.requests``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("RecordingServer is not running")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> RecordingServer:
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _record_and_answer(self) -> None:
                recorded.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
                if self.command == "GET":
                    body, status = b'{"resourceType":"Bundle","type":"searchset","total":0}', 200
                else:
                    body, status = b'{"error":"method not allowed"}', 405
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _record_and_answer

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> RecordingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
