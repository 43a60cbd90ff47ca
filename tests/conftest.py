"""Shared fixtures: the knowledge and screening in process, the real service under uvicorn on 127.0.0.1, and a real
FHIR server (Medplum, Node).

The tests mirror cds/ (tests/api, tests/screening, tests/knowledge, tests/fhir, tests/store) and run in process;
everything under tests/integration/ starts something real (the service as `make run` starts it, the Node FHIR
server, PostgreSQL, a browser) and is marked `integration` here; elsewhere the few tests that need such a thing
carry the marker themselves (the PostgreSQL runs of tests/store, the fetch-path scenarios of tests/screening).
`pytest -m "not integration"` is the fast loop.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cds.api.app import create_app
from cds.api.fastpath import with_fast_path
from cds.knowledge.loader import KnowledgeBase, load_knowledge
from cds.knowledge.policy import ClinicalPolicy
from cds.screening.pipeline import Screening
from cds.settings import Settings

from fhirserver import FhirServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The async tests (@pytest.mark.anyio) run on asyncio, as the service does."""
    return "asyncio"

# The clinical suite: what the screening modules decide, run again on the compiled build (`make test-compiled`).
CLINICAL_FILES = {"test_scenarios", "test_coverage", "test_text_path", "test_population", "test_clinician_text",
                  "test_knowledge", "test_matching", "test_index", "test_grammar", "test_validation", "test_malformed",
                  "test_fetch", "test_build", "test_sandbox_client"}
CLINICAL_DIRS = {"screening", "knowledge", "fhir"}  # tests/<package>/ mirror cds/<package>/


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path
        if path.stem in CLINICAL_FILES or CLINICAL_DIRS & set(path.relative_to(ROOT / "tests").parts[:-1]):
            item.add_marker(pytest.mark.clinical)
        if path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python -m cds` in a subprocess, as `make run` starts it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}  # the test says every setting
        self.data_dir = tempfile.mkdtemp(prefix="cds-test-data-")
        # removed with the object, not at stop(): a test may start the same service again on the same store
        weakref.finalize(self, shutil.rmtree, self.data_dir, True)
        self.env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "CDS_LOG_LEVEL": "WARNING",
                         "CDS_DATA_DIR": self.data_dir})
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def trusting(cls, issuer: str, jwks_url: str, **env: str) -> Service:
        """A production-mode service that trusts one EHR, `issuer`, whose keys are at `jwks_url`."""
        svc = cls()
        svc.env.update({"CDS_ENV": "prod", "CDS_PUBLIC_BASE_URL": svc.base_url, "CDS_PSEUDONYM_KEY": "k",
                        "CDS_TRUSTED_ISSUERS": json.dumps({issuer: {"jwks_url": jwks_url}}), **env})
        return svc

    def start(self) -> Service:
        self.proc = subprocess.Popen([sys.executable, "-m", "cds"], cwd=ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # TEST_START_TIMEOUT: seconds to wait for /healthz (start-up parses every value set; on a loaded machine the
        # pure-Python YAML parser can take longer than the default)
        limit = float(os.environ.get("TEST_START_TIMEOUT", "30"))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.communicate()[0].decode(errors="replace")  # and closes the pipe
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{out}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"service did not start within {limit:g} s")

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    with Service({"CDS_ENV": "dev"}) as svc:
        yield svc


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=10) as c:
        yield c


def dev_settings(**overrides: Any) -> Settings:
    """The settings `make run` gives (CDS_ENV=dev), whatever CDS_ variables the suite's environment has."""
    return Settings(**{"env": "dev", "log_level": "WARNING", **overrides})


@pytest.fixture(scope="session")
def kb() -> KnowledgeBase:
    """The knowledge in cards/, as the service loads it in dev."""
    settings = dev_settings()
    return load_knowledge(settings.knowledge_dir, env=settings.env).with_overrides(settings.silent_rules,
                                                                                   settings.active_rules)


@pytest.fixture(scope="session")
def screening(kb: KnowledgeBase) -> Screening:
    """The screening as the service builds it at start-up (cds/api/app.py), without the service around it."""
    settings = dev_settings()
    return Screening(kb, ClinicalPolicy.from_settings(settings), settings)


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app as `python -m cds` serves it (`with_fast_path(create_app(settings))`), started and stopped with its
    lifespan, behind an httpx client that calls it in process (ASGI, no socket)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=with_fast_path(app)), base_url="http://testserver", timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """The dev service in process, shared by the session's API tests (as `service` is by the integration tests)."""
    async with in_process(dev_settings(data_dir=tmp_path_factory.mktemp("cds-data"))) as c:
        yield c


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirServer]:
    with FhirServer(token="fhir-test-token") as fs:
        yield fs


_RELATIVE = re.compile(r"\$\{today((?:[+-]\d+[dwmy])*)\}")


def _shift(day: date, n: int, unit: str) -> date:
    if unit == "d":
        return day + timedelta(days=n)
    if unit == "w":
        return day + timedelta(weeks=n)
    year, month = divmod(day.month - 1 + n * (12 if unit == "y" else 1), 12)
    year, month = day.year + year, month + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def with_dates(value: Any, today: date | None = None) -> Any:
    """Replace `${today}`, `${today-30d}`, `${today+2w}`, `${today-7m}`, `${today-12y+1d}` with ISO dates."""
    today = today or date.today()
    if isinstance(value, str):
        def resolve(m: re.Match[str]) -> str:
            day = today
            for sign, n, unit in re.findall(r"([+-])(\d+)([dwmy])", m.group(1)):
                day = _shift(day, int(n) if sign == "+" else -int(n), unit)
            return day.isoformat()
        return _RELATIVE.sub(resolve, value)
    if isinstance(value, list):
        return [with_dates(v, today) for v in value]
    if isinstance(value, dict):
        return {k: with_dates(v, today) for k, v in value.items()}
    return value


def load_fixture(relative: str) -> Any:
    return with_dates(json.loads((FIXTURES / relative).read_text(encoding="utf-8")))
