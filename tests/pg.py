"""A PostgreSQL server for tests, and a fresh database per test on it.

Where the server comes from, in order (`CDS_TEST_PG` = `auto` (default), `local`, `throwaway` or `skip`):
1. `CDS_TEST_PG_URL`, if set: an admin URL such as `postgresql://postgres@db.example:5432/postgres` whose user
   may CREATE DATABASE.
2. The machine's server on 127.0.0.1:5432 (trust auth, database `test`, user `postgres` or the OS user), as on
   the development and CI machines.
3. A throwaway cluster started from the Debian `postgresql` package's binaries (`/usr/lib/postgresql/*/bin`:
   initdb, pg_ctl) in a temporary directory on a free port, as the `postgres` OS user when running as root;
   stopped and deleted when the test process exits.
Otherwise the tests that need PostgreSQL are skipped with a message saying how to enable them.

Each test gets its own uniquely named database (`cds_test_<pid>_<random>`), dropped afterwards, so test runs
never clobber each other or the `test` database.
"""

from __future__ import annotations

import asyncio
import atexit
import getpass
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

HOW_TO_ENABLE = (
    "PostgreSQL tests skipped: no server answered on 127.0.0.1:5432 (trust auth, database `test`) and no "
    "throwaway cluster could be started. Enable them by running PostgreSQL locally "
    "(`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`), by installing Debian's "
    "`postgresql` package (`apt-get install postgresql`; the tests then start their own cluster), or by setting "
    "CDS_TEST_PG_URL=postgresql://USER@HOST:PORT/DB (a user allowed to CREATE DATABASE).")


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    admin_database: str
    origin: str  # "env", "local" or "throwaway"

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def new_database_url(self) -> str:
        """The URL of a uniquely named test database that does not exist yet."""
        return self.url(f"cds_test_{os.getpid()}_{secrets.token_hex(4)}")

    def create_database(self, url: str | None = None) -> str:
        """Create a new empty database (named by `url`, or a new name); returns its SQLAlchemy URL."""
        url = url or self.new_database_url()
        asyncio.run(self._admin(f'CREATE DATABASE "{_test_database_name(url)}"'))
        return url

    def drop_database(self, url: str) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{_test_database_name(url)}" WITH (FORCE)'))

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(host=self.host, port=self.port, user=self.user,
                                     database=self.admin_database, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def _test_database_name(url: str) -> str:
    name = url.rsplit("/", 1)[-1]
    if not re.fullmatch(r"cds_test_\d+_[0-9a-f]+", name):
        raise ValueError(f"refusing to touch {name!r}: not a test database")
    return name


_server: PgServer | None = None
_failure: str | None = None


def server() -> PgServer:
    """The session's PostgreSQL server, found or started once; `pytest.skip` if there is none."""
    global _server, _failure
    if _server is None and _failure is None:
        try:
            _server = _find_or_start()
        except _Unavailable as exc:
            _failure = f"{HOW_TO_ENABLE} ({exc})"
    if _server is None:
        pytest.skip(_failure or HOW_TO_ENABLE)
    return _server


class _Unavailable(Exception):
    pass


def _find_or_start() -> PgServer:
    mode = os.environ.get("CDS_TEST_PG", "auto")
    if mode == "skip":
        raise _Unavailable("CDS_TEST_PG=skip")
    reasons: list[str] = []
    if url := os.environ.get("CDS_TEST_PG_URL"):
        found = _probe_url(url)
        if found:
            return found
        raise _Unavailable(f"CDS_TEST_PG_URL={url} did not answer")
    if mode in ("auto", "local"):
        for user in dict.fromkeys(("postgres", getpass.getuser())):
            for database in ("test", "postgres"):
                if _can_connect("127.0.0.1", 5432, user, database):
                    return PgServer("127.0.0.1", 5432, user, database, "local")
        reasons.append("nothing answered on 127.0.0.1:5432")
    if mode in ("auto", "throwaway"):
        try:
            return _start_throwaway()
        except _Unavailable as exc:
            reasons.append(str(exc))
    raise _Unavailable("; ".join(reasons) or f"CDS_TEST_PG={mode}")


def _probe_url(url: str) -> PgServer | None:
    m = re.fullmatch(r"postgres(?:ql)?(?:\+\w+)?://([^@/:]+)(?::[^@/]*)?@([^:/]+)(?::(\d+))?/(\w+)", url)
    if not m:
        raise _Unavailable(f"cannot parse CDS_TEST_PG_URL={url!r} (want postgresql://user@host:port/db)")
    user, host, port, database = m.group(1), m.group(2), int(m.group(3) or 5432), m.group(4)
    return PgServer(host, port, user, database, "env") if _can_connect(host, port, user, database) else None


def _can_connect(host: str, port: int, user: str, database: str) -> bool:
    async def attempt() -> None:
        conn = await asyncpg.connect(host=host, port=port, user=user, database=database, timeout=3)
        await conn.close()

    try:
        asyncio.run(attempt())
        return True
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_throwaway() -> PgServer:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))  # type: ignore[union-attr]
    if not candidates:
        raise _Unavailable("no Debian PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    bindir = Path(candidates[-1]).parent
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise _Unavailable("running as root and there is no `postgres` account to run initdb") from exc
        run_as = {"user": account.pw_uid, "group": account.pw_gid}
    base = Path(tempfile.mkdtemp(prefix="cds-test-pg-"))
    if run_as:
        os.chown(base, run_as["user"], run_as["group"])
    data, log = base / "data", base / "postgres.log"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, env=env, timeout=120, **run_as)
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-F -p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, env=env, timeout=90, **run_as)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(base, ignore_errors=True)
        raise _Unavailable(
            f"throwaway cluster failed to start: {exc} {detail.decode(errors='replace')[-300:]}") from exc

    def stop() -> None:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, env=env, timeout=60, **run_as)
        shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    if not _can_connect("127.0.0.1", port, "postgres", "postgres"):
        raise _Unavailable(f"throwaway cluster on port {port} does not accept connections; see {log}")
    return PgServer("127.0.0.1", port, "postgres", "postgres", "throwaway")
