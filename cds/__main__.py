"""`python -m cds`: run the service with uvicorn on $HOST:$PORT (default 127.0.0.1:8080)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .errors import KnowledgeError
from .settings import get_settings


def main() -> int:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8080"))
    if settings.env == "dev":
        logging.getLogger("cds").warning(
            "DEV MODE: client JWTs are not verified and loopback FHIR servers are allowed; never use with real data")
    try:
        from .app import create_app

        app = create_app(settings)
    except KnowledgeError as exc:
        logging.getLogger("cds").error("refusing to start: invalid knowledge in cards/: %s", exc)
        return 2
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
