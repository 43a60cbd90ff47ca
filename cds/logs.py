"""Logging: one JSON object per line (or plain text in dev), with bearer tokens and JWTs redacted.

Every record passes a `RedactFilter` on the handler, so records propagated from any logger (uvicorn included)
are scrubbed: `Bearer <token>`, anything shaped like a JWT (`eyJ...`) and `access_token` values become
`[REDACTED]`. Extra fields given with `extra={...}` (hookInstance, patient pseudonym, ...) become JSON keys.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

REDACTED = "[REDACTED]"
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 " + REDACTED),
    (re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"), REDACTED),
    (re.compile(r"""(?i)(["']?access_token["']?\s*[:=]\s*["']?)[^"'&\s,}]+"""), r"\1" + REDACTED),
]
# attributes every LogRecord has (and uvicorn's color_message); anything else came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                     "color_message"}


_TELLTALES = ("bearer", "eyj", "access_token")  # a cheap test (on lower-cased text) before the expressions


def redact(text: str) -> str:
    """Replace bearer tokens, JWTs and access_token values in text with [REDACTED]."""
    lowered = text.lower()
    if not any(t in lowered for t in _TELLTALES):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


class RedactFilter(logging.Filter):
    """Scrub secrets from the message (after %-formatting) and from string extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        extras = record.__dict__
        for key, value in extras.items():  # values replaced in place: the dict keeps its size
            if key not in _STANDARD and not isinstance(value, int) and not isinstance(value, float):
                extras[key] = _redact_value(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exc."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def timestamp(self, created: float) -> str:
        """`created` as ISO 8601 UTC to the millisecond, as `datetime.isoformat` writes it.

        The date and time to the second are formatted once per second: building a datetime for every line was a
        large part of the cost of logging it (bench/README.md, "Measurements behind the code").
        """
        second = int(created)
        micros = round((created - second) * 1_000_000)  # as datetime.fromtimestamp rounds
        if micros == 1_000_000:
            second, micros = second + 1, 0
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Plain text for a terminal; the traceback is redacted too."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


def configure_logging(level: str = "INFO", fmt: Literal["json", "text"] = "json") -> logging.Handler:
    """Install one redacting stderr handler on the root logger; uvicorn's loggers propagate to it.

    Start uvicorn with `log_config=None` so that it keeps this configuration.
    """
    # Neither format prints the caller, thread or process: skip collecting them for every record (the logging
    # HOWTO's "Optimization" section). The caller lookup walks the whole ASGI stack.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in ("httpx", "httpcore"):  # their INFO lines carry FHIR URLs, and so patient ids
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("aiosqlite", "sqlalchemy"):  # at DEBUG, every statement and its parameters: not even then
        logging.getLogger(name).setLevel(logging.WARNING)
    # Alembic's INFO lines are its plugins and dialect at every start; the store logs each schema change itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return handler
