"""Every context field of both order hooks checked against the hook's definition: a wrong type is a 400 with an
OperationOutcome naming the field, never a 500 (order-sign with a number for `selections` used to be a 500)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import load_fixture

pytestmark = pytest.mark.anyio

SERVICE = "/cds-services/mesotherapy-contraindications"
WRONG = [1, 2.5, "ServiceRequest/sr-meso", {"reference": "ServiceRequest/sr-meso"}, True, [], [1], [None], [""]]


def request_for(hook: str) -> dict[str, Any]:
    request = load_fixture("requests/order-select-example.json")
    request["hook"] = hook
    return request


def assert_names(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["expression"] == [field]
    assert field in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize("value", WRONG, ids=repr)
async def test_selections_of_the_wrong_type_get_400(api: httpx.AsyncClient, hook: str, value: Any) -> None:
    request = request_for(hook)
    request["context"]["selections"] = value
    assert_names(await api.post(SERVICE, json=request), "context.selections")


async def test_order_sign_with_well_formed_selections_is_answered(api: httpx.AsyncClient) -> None:
    request = request_for("order-sign")
    assert isinstance(request["context"]["selections"], list)
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200 and response.json()["cards"]


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize(("field", "value"), [
    ("userId", 7), ("userId", {"reference": "Practitioner/1"}), ("userId", ["Practitioner/1"]),
    ("patientId", 7), ("patientId", True), ("patientId", {"id": "p"}),
    ("encounterId", 7), ("encounterId", ["e"]), ("encounterId", None),
    ("draftOrders", "Bundle"), ("draftOrders", []), ("draftOrders", 3), ("draftOrders", True),
], ids=repr)
async def test_context_fields_of_the_wrong_type_get_400(api: httpx.AsyncClient, hook: str, field: str,
                                                      value: Any) -> None:
    request = request_for(hook)
    request["context"][field] = value
    assert_names(await api.post(SERVICE, json=request), f"context.{field}")


@pytest.mark.parametrize("field", ["scope", "subject", "patient"])
async def test_fhir_authorization_fields_of_the_wrong_type_get_400(api: httpx.AsyncClient, field: str) -> None:
    request = request_for("order-select")
    request["fhirServer"] = "http://127.0.0.1:9/fhir"
    request["fhirAuthorization"] = {"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                    "scope": "patient/*.read", "subject": "cds", field: 12}
    assert_names(await api.post(SERVICE, json=request), f"fhirAuthorization.{field}")
