"""`python -m cds`: run the service with uvicorn on $HOST:$PORT (default 127.0.0.1:8080)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn
from pydantic import ValidationError

from .errors import ConfigError, KnowledgeError
from .logs import configure_logging
from .settings import get_settings


def main() -> int:
    try:
        settings = get_settings()
    except ValidationError as exc:
        problems = "; ".join(f"CDS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"refusing to start: invalid settings: {problems}", file=sys.stderr)  # noqa: T201
        return 2
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("cds")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8080"))
    if settings.env == "dev":
        log.warning("DEV MODE: client JWTs %s, loopback FHIR servers allowed; never use with real patient data",
                    "are verified" if settings.jwt_required else "are NOT verified")
    try:
        from .api.app import create_app
        from .api.fastpath import with_fast_path

        app = with_fast_path(create_app(settings))
    except (KnowledgeError, ConfigError) as exc:
        kind = "invalid knowledge in cards/" if isinstance(exc, KnowledgeError) else "unsafe configuration"
        log.error("refusing to start: %s: %s", kind, exc)
        return 2
    from .api.server import protocol

    uvicorn.run(app, host=host, port=port, log_config=None, log_level=settings.log_level.lower(),
                access_log=settings.access_log, http=protocol(settings),
                timeout_keep_alive=max(1, round(settings.http_keepalive_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
