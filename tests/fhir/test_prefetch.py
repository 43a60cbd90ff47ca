"""Gathering from prefetch (cds/fhir/prefetch.py): what is used as sent, and what is reported as not obtained when
the service may not fetch the rest. The fetching itself is tested against the Node FHIR server
(tests/integration/test_fetch.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cds.fhir.prefetch import TEMPLATES, gather

from conftest import dev_settings

pytestmark = pytest.mark.anyio


def bundle(*resources: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                           "entry": [{"resource": r} for r in resources]}
    if next_url:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


def request(**more: Any) -> dict[str, Any]:
    prefetch: dict[str, Any] = {t.key: bundle() for t in TEMPLATES}
    prefetch["patient"] = {"resourceType": "Patient", "id": "p1"}
    return {"hook": "order-sign", "hookInstance": "h", "context": {"patientId": "p1"}, "prefetch": prefetch, **more}


async def test_a_complete_prefetch_is_used_without_contacting_anyone() -> None:
    body = request(fhirServer="https://not-listed.example.org/fhir",
                   fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    condition = {"resourceType": "Condition", "id": "c1"}
    body["prefetch"]["conditions"] = bundle(condition)
    got = await gather(body, dev_settings(allowed_fhir_servers=[]), None)  # type: ignore[arg-type]  # no session
    assert got.unavailable == {} and got.fetched == set() and got.errors == []
    assert got.data["conditions"] == [condition] and got.data["patient"] == [body["prefetch"]["patient"]]


async def test_a_paginated_prefetch_without_a_server_is_kept_and_reported_incomplete() -> None:
    body = request()
    condition = {"resourceType": "Condition", "id": "c1"}
    body["prefetch"]["conditions"] = bundle(condition, next_url="https://ehr.example.org/fhir/Condition?page=2")
    del body["prefetch"]["allergies"]
    got = await gather(body, dev_settings(), None)  # type: ignore[arg-type]
    assert got.data["conditions"] == [condition]  # what came is screened
    assert got.unavailable["conditions"] == ("the prefetch was paginated, and it gave no FHIR server to read it from "
                                             "for the remaining pages")
    assert got.unavailable["allergies"] == "the EHR sent no prefetch for it, and it gave no FHIR server to read it from"
    assert set(got.unavailable) == {"conditions", "allergies"}
