"""Issue 16: a client that behaves like the CDS Hooks community's reference sandbox reaches every served hook.

The sandbox keys the services it discovered by `<discovery URL>/<id>` (a second entry with the same id replaces the
first), and each of its screens calls only the services registered for that screen's hook, showing the cards of the
current hook only.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import load_fixture

SCREENS = {  # the sandbox's screen for a hook, with a request written for it (a scenario of that hook)
    "order-select": "scenarios/ehr-active-pregnancy-condition-z34.json",
    "order-sign": "scenarios/order-sign-evaluates-all-draft-orders.json",
    "patient-view": "scenarios/patient-view-booked-appointment-pregnancy-critical.json",
    "appointment-book": "scenarios/appointment-book-mesotherapy-pregnancy-critical.json",
}


class SandboxLikeClient:
    def __init__(self, http: httpx.AsyncClient, discovery_url: str) -> None:
        self.http = http
        self.discovery_url = discovery_url
        self.services: dict[str, dict[str, Any]] = {}

    async def discover(self) -> None:
        for service in (await self.http.get(self.discovery_url)).json()["services"]:
            self.services[f"{self.discovery_url}/{service['id']}"] = service  # same id: the last entry wins

    async def screen(self, hook: str, request: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
        """Call the services of this hook only; the cards shown are those of this hook's answers."""
        called, cards = [], []
        for url, service in self.services.items():
            if service["hook"] != hook:
                continue
            prefetch = {key: request["prefetch"][key] for key in service.get("prefetch", {})
                        if key in request.get("prefetch", {})}
            body = {**request, "hook": hook, "prefetch": prefetch}
            response = await self.http.post(url, json=body)
            assert response.status_code == 200, (url, response.text)
            called.append(url)
            cards.extend(response.json()["cards"])
        return called, cards


@pytest.mark.anyio
async def test_a_sandbox_like_client_reaches_every_served_hook(api: httpx.AsyncClient) -> None:
    client = SandboxLikeClient(api, str(api.base_url).rstrip("/") + "/cds-services")
    await client.discover()
    assert sorted(s["hook"] for s in client.services.values()) == sorted(SCREENS)  # nothing was replaced
    for hook, fixture in SCREENS.items():
        request = load_fixture(fixture)["request"]
        called, cards = await client.screen(hook, request)
        assert called == [f"{client.discovery_url}/mesotherapy-{hook}"]
        assert cards, f"no cards at {hook}"
        shown = {c["source"]["topic"]["code"]: c["indicator"] for c in cards}
        assert shown.get("pregnancy") == "critical", (hook, shown)
