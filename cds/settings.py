"""Service settings, read from `CDS_*` environment variables (see the README's table)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _root() -> Path:
    """The project directory the defaults below are in: the source checkout this package is in, or else (the
    compiled build in build/compiled, an installed wheel) the working directory. The image sets them all."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "cards").is_dir() else Path.cwd()


ROOT = _root()


def _split_list(value: Any) -> Any:
    """Accept a JSON array or a comma-separated string for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDS_", extra="ignore", env_ignore_empty=True)

    env: Literal["dev", "test", "prod"] = "prod"  # `make run` sets dev; a bare start is production-strict
    knowledge_dir: Path = ROOT / "cards"
    public_base_url: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False  # uvicorn's per-request access line; hook calls are logged by the service anyway

    # Trusting CDS clients (issue 4)
    require_jwt: bool | None = None  # default: True, except in dev
    trusted_issuers: str | None = None  # JSON inline, or a path to a JSON/YAML file
    jwt_leeway_s: int = 60
    jwks_cache_s: int = 3600
    jwks_refresh_interval_s: float = 30.0  # at most one refetch per issuer per interval on an unknown kid
    pseudonym_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Storage (issue 5): SQLite in data_dir unless a database URL is given
    data_dir: Path = ROOT / "data"
    database_url: str | None = None
    audit_spool: Path | None = None  # cards and feedback not yet stored (store outage); default data_dir/...
    # Audit retention: issued cards and the feedback on them are deleted this long after issue (README: why 7 years)
    audit_retention_days: float = 2557.0  # 7 years
    audit_prune_interval_s: float = 3600.0
    audit_max_pending: int = 100_000  # cards kept while the store is down; beyond it the oldest are dropped

    # FHIR access (CDS Hooks "FHIR Resource Access")
    allowed_fhir_servers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_loopback_fhir: bool | None = None  # default: True in dev, False otherwise
    fhir_anonymous: bool | None = None  # fetch without fhirAuthorization; default: True in dev only
    fhir_timeout_s: float = 0.5
    deadline_s: float = 0.8
    fhir_max_pages: int = 20
    fhir_max_bytes: int = 10_000_000  # per FHIR answer, as sent and as inflated
    fhir_max_entries: int = 10_000  # per search, next pages counted; more: screened this far, and said so

    # clinical policy (knowledge parameters a clinic can tune)
    weaning_wait_months: int = 6
    postpartum_months: int = 12  # a delivery this recent, with no feeding record after it, asks about breastfeeding
    mi_recent_days: int = 180
    pregnancy_status_max_age_days: int = 294  # 42 weeks
    breastfeeding_status_max_age_days: int = 365
    childbearing_age_min: int = 12
    childbearing_age_max: int = 55

    # silent mode (issue 17): rule ids computed, recorded and counted but not returned, in this deployment;
    # `active_rules` shows rules whose status in cards/ is `silent`
    silent_rules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    active_rules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # the demo EHR page at /demo (issue 17): on in dev, off otherwise unless set
    demo: bool | None = None
    demo_patients_dir: Path = ROOT / "fixtures" / "synthetic"

    max_body_bytes: int = 1_048_576
    # HTTP limits (cds/api/server.py, uvicorn; deploy/README.md maps them to a reverse proxy)
    http_max_headers: int = 100
    http_max_head_bytes: int = 32_768  # request line and headers together
    http_head_timeout_s: float = 10.0  # from the request's first byte (or the connection's opening) to its last header
    http_body_timeout_s: float = 10.0  # for the whole body of a hook or feedback call
    http_keepalive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_text_chars: int = 4096  # a longer text in a record is matched on its first part only, never memoised

    # Hooks beyond orders, and repeated interruptions (issue 16)
    planned_lookahead_days: int = Field(default=180, ge=1)  # patient-view: plans dated up to this far ahead
    answered_card_memory_hours: float = Field(default=24.0, ge=0)  # 0: every card is shown at every hook
    answered_card_refresh_s: float = Field(default=1.0, ge=0)  # how often a process rereads the answered cards

    @field_validator("allowed_fhir_servers", mode="before")
    @classmethod
    def _parse_servers(cls, value: Any) -> Any:
        return [s.rstrip("/") for s in _split_list(value)]

    @field_validator("silent_rules", "active_rules", mode="before")
    @classmethod
    def _parse_rule_ids(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        return _split_list(value)

    @property
    def jwt_required(self) -> bool:
        return self.env != "dev" if self.require_jwt is None else self.require_jwt

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL for SQLAlchemy's async engine (SQLite file in data_dir by default)."""
        if self.database_url:
            url = self.database_url
            for plain, driver in (("postgresql://", "postgresql+asyncpg://"), ("postgres://", "postgresql+asyncpg://"),
                                  ("sqlite:///", "sqlite+aiosqlite:///")):
                if url.startswith(plain):
                    return driver + url[len(plain):]
            return url
        return f"sqlite+aiosqlite:///{self.data_dir / 'cds.sqlite3'}"

    @property
    def audit_spool_path(self) -> Path:
        return self.audit_spool or self.data_dir / "audit-spool.jsonl"

    @property
    def demo_enabled(self) -> bool:
        return self.env == "dev" if self.demo is None else self.demo

    @property
    def loopback_fhir_allowed(self) -> bool:
        return self.env == "dev" if self.allow_loopback_fhir is None else self.allow_loopback_fhir

    @property
    def anonymous_fhir_allowed(self) -> bool:
        return self.env == "dev" if self.fhir_anonymous is None else self.fhir_anonymous


@lru_cache
def get_settings() -> Settings:
    return Settings()
