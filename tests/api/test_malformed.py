"""Malformed data in the request never crashes a hook call: every answer is 200 with cards, or 400 / 412 with an
OperationOutcome, never a 500 that would leave the clinician with no screening at all.

Each request is a real one with one to four values replaced by JSON of the wrong shape (a number where an array
belongs, an object where a string belongs, ...), anywhere in the body: prefetch resources, Bundles, draft orders.
The mutations are drawn from a fixed seed, so a failure is reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import load_fixture, with_dates
from scenarios import assert_no_empty_values

pytestmark = pytest.mark.anyio

SERVICE = "/cds-services/mesotherapy-contraindications"
WRONG_SHAPES: list[Any] = [None, 0, -1, 3.5, True, "", "x", "2024-13-45", [], {}, [1], [None], {"a": 1},
                           {"coding": "x"}, {"coding": [None, 5]}, [{"system": 5, "code": ["x"]}]]
BASES = ["requests/order-select-example.json", "scenarios/pregnancy-active-condition-snomed.json",
         "scenarios/bleeding-risk-active-warfarin-rxnorm.json"]


def paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, (*path, i))


def replace(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for step in path[:-1]:
        value = value[step]
    value[path[-1]] = new


def base_request(name: str) -> dict[str, Any]:
    data = with_dates(load_fixture(name))
    return data.get("request", data)


@pytest.mark.parametrize("name", BASES)
async def test_wrong_shapes_anywhere_never_make_a_500(name: str, api: httpx.AsyncClient) -> None:
    base = base_request(name)
    where = list(paths(base))
    rng = random.Random(f"malformed:{name}")
    seen: Counter[int] = Counter()
    for _ in range(250):
        request = copy.deepcopy(base)
        for _ in range(rng.randint(1, 4)):
            with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier replacement removed this path
                replace(request, rng.choice(where), copy.deepcopy(rng.choice(WRONG_SHAPES)))
        response = await api.post(SERVICE, json=request)
        seen[response.status_code] += 1
        assert response.status_code in (200, 400, 412), (response.status_code, response.text[:500])
        if response.status_code == 200:
            for card in response.json()["cards"]:
                assert_no_empty_values(card)
        else:
            assert response.json()["resourceType"] == "OperationOutcome"
    assert seen[200] > 100, seen  # most mutations leave a request that must still be screened


@pytest.mark.parametrize("bundle", [{"entry": 5}, {"entry": "x"}, {"entry": True}, {"link": 7}],
                         ids=["entry-number", "entry-string", "entry-boolean", "link-number"])
async def test_a_bundle_that_cannot_be_read_is_data_not_obtained_not_an_empty_list(bundle: dict[str, Any],
                                                                                   api: httpx.AsyncClient) -> None:
    request = base_request("scenarios/pregnancy-active-condition-snomed.json")
    assert "fhirServer" not in request  # nothing to fetch instead: the card must say what was not checked
    request["prefetch"]["conditions"] = {"resourceType": "Bundle", "type": "searchset", **bundle}
    response = await api.post(SERVICE, json=request)
    assert response.status_code == 200, response.text
    cards = {c["source"]["topic"]["code"]: c for c in response.json()["cards"]}
    assert "Conditions (problem list)" in cards["screening-incomplete"]["detail"]
    assert "not a readable FHIR resource" in cards["screening-incomplete"]["detail"]
