"""The service's answers: FHIR JSON bodies, and every error as an OperationOutcome.

`error_response` is the one place an exception becomes an answer, for the hook fast path (fastpath.py) and the
app's exception handlers (app.py) alike, so the two paths cannot drift apart.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CDSError, NotAuthenticated, RequestTimeout, ServiceNotFound

log = logging.getLogger("cds")
FHIR_JSON = "application/fhir+json"


class FhirJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def outcome_response(error: CDSError) -> Response:
    headers = ({"WWW-Authenticate": "Bearer"} if isinstance(error, NotAuthenticated) else
               {"Connection": "close"} if isinstance(error, RequestTimeout) else None)
    return FhirJSON(error.to_operation_outcome(), status_code=error.status, media_type=FHIR_JSON, headers=headers)


def error_response(exc: BaseException, path: str) -> Response:
    """The OperationOutcome answer for any exception raised while answering a request to `path`.

    A CDSError answers with its own status (401 never says why: the reason stays in the log); the framework's
    HTTP errors (404 no route, 405 method) keep their status; anything else is logged with its traceback and
    answered 500.
    """
    if isinstance(exc, NotAuthenticated):
        return outcome_response(NotAuthenticated("authentication required"))
    if isinstance(exc, CDSError):
        return outcome_response(exc)
    if isinstance(exc, StarletteHTTPException):
        error = ServiceNotFound("no such endpoint") if exc.status_code == 404 else CDSError(str(exc.detail))
        error.status = exc.status_code
        return outcome_response(error)
    log.error("unexpected error", exc_info=exc, extra={"path": path})
    return outcome_response(CDSError("internal error; the event was logged"))
