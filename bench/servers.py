"""Start and stop the benchmark's server processes: the service, the floor app and the FHIR stub.

Each runs in its own process on 127.0.0.1 with a free port, its output going to a log file (a pipe nobody reads
would eventually block the server). Only the processes started here are ever stopped, by their own pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the process has used so far; None where /proc is not there."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float) -> None:
        """Poll GET /healthz until it answers 200; RuntimeError (with the log's tail) if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path, port: int) -> Server:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Server(name, port, proc, log)


def start_service(log_dir: Path, settings: Callable[[int], dict[str, str]] | None = None) -> Server:
    """The service as `make run` starts it: `python -m cds` in dev mode (uvicorn, loop/http "auto", INFO logs).

    Its audit store (SQLite) goes to a fresh directory beside the logs, not to the developer's data/. `settings`,
    given the port, returns more environment (the JWT workload's trusted issuer).
    """
    port = free_port()
    env = {"CDS_ENV": "dev", "HOST": "127.0.0.1", "PORT": str(port), "CDS_DATA_DIR": str(log_dir / "data"),
           **(settings(port) if settings else {})}
    return start("service", ["-m", "cds"], env, log_dir, port)


def start_floor(log_dir: Path) -> Server:
    port = free_port()
    return start("floor", [str(BENCH / "floor.py")], {"HOST": "127.0.0.1", "PORT": str(port)}, log_dir, port)


def start_stub(log_dir: Path, data_file: Path, token: str, delays_json: str) -> Server:
    port = free_port()
    args = [str(BENCH / "fhirstub.py"), "--port", str(port), "--data", str(data_file), "--token", token,
            "--delays", delays_json]
    return start("fhir-stub", args, {}, log_dir, port)


def stack_versions() -> dict[str, str]:
    """Versions of the serving stack; uvicorn's "auto" picks uvloop and httptools only when they import."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "orjson", "httpx", "fhir.resources"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, str | int]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": model, "cores": os.cpu_count() or 0, "memory": mem, "platform": sys.platform,
            "load_average_at_start": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state() -> dict[str, str | bool]:
    """The commit measured, and whether the service's code differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "service_code_modified": bool(git("status", "--porcelain", "--", "cds", "cards"))}
