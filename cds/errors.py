"""Errors the service answers with, each rendered as a FHIR OperationOutcome.

    CDSError (500, exception)
     ├── InvalidRequest      400  malformed JSON, missing or ill-typed field, hook not served
     ├── NotAuthenticated    401  (body never says why)
     ├── ServiceNotFound     404  unknown service id or path
     ├── RequestTimeout      408  the request body stopped arriving (the connection is closed)
     ├── PayloadTooLarge     413
     ├── DataUnavailable     412  the Patient could not be obtained
     └── ServiceUnavailable  503  the replay cache or the audit store is down
    KnowledgeError, ConfigError  raised at start-up only: cards/ or the settings are invalid
"""

from __future__ import annotations

from typing import Any


class CDSError(Exception):
    """Base of every error the API turns into an OperationOutcome."""

    status = 500
    issue_code = "exception"

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression

    def to_operation_outcome(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": "error",
            "code": self.issue_code,
            "diagnostics": self.message,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


class InvalidRequest(CDSError):
    """The request body is not a valid CDS Hooks request for this service."""

    status = 400
    issue_code = "invalid"


class NotAuthenticated(CDSError):
    """The caller could not be authenticated; the reason is logged, not returned."""

    status = 401
    issue_code = "login"


class ServiceNotFound(CDSError):
    """No CDS service with this id."""

    status = 404
    issue_code = "not-found"


class RequestTimeout(CDSError):
    """The request body did not arrive in time."""

    status = 408
    issue_code = "timeout"


class PayloadTooLarge(CDSError):
    """The request body is over the configured limit."""

    status = 413
    issue_code = "too-costly"


class DataUnavailable(CDSError):
    """Data the service cannot work without could not be obtained (CDS Hooks: 412)."""

    status = 412
    issue_code = "not-found"


class ServiceUnavailable(CDSError):
    """A dependency the request cannot be answered without (the replay cache, the audit store) is down."""

    status = 503
    issue_code = "transient"


class KnowledgeError(Exception):
    """The clinical knowledge in cards/ is invalid; the service refuses to start."""


class ConfigError(Exception):
    """The settings are not safe to run with (production mode); the service refuses to start."""
