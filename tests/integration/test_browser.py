"""Issue 17 in a real browser: the demo EHR page and the review dashboard, driven in headless Chromium.

The flow: order mesotherapy for a pregnant patient, see the critical card, take its "remove the order"
suggestion and see the order gone, override another card with a reason and see it counted on the dashboard;
open a chart (patient-view, nothing planned: no cards) and book a mesotherapy appointment (appointment-book).
Screenshots go to CDS_SCREENSHOTS (`make screenshots` writes docs/), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from cds.store import FeedbackEntry, IssuedCard, Store

from browser import chromium
from conftest import ROOT, Service

REMOVE = "Remove the mesotherapy order"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], errors  # no script error on any page


def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("CDS_SCREENSHOTS") or tmp_path)
    target = target if target.is_absolute() else ROOT / target
    target.mkdir(parents=True, exist_ok=True)
    return target


def seed_history(data_dir: Path) -> None:
    """Ten weeks of earlier cards and feedback, so the dashboard's chart has a history (fixed random seed)."""
    rng = random.Random(17)
    rules = [("pregnancy", "critical", ["negative-pregnancy-test", "record-outdated"]),
             ("allergy-history", "warning", ["allergy-tested", "record-outdated", "benefit-outweighs-risk"]),
             ("bleeding-risk", "warning", ["anticoagulation-managed", "benefit-outweighs-risk"]),
             ("pregnancy-status-unknown", "info", ["negative-pregnancy-test"])]
    now = datetime.now(UTC)
    cards, feedback = [], []
    for week in range(10, 0, -1):
        for rule, indicator, reasons in rules:
            for i in range(rng.randint(2, 9)):
                at = now - timedelta(weeks=week, hours=rng.randint(0, 100))
                uid = f"seed-{rule}-{week}-{i}"
                silent = rule == "pregnancy-status-unknown" and week > 6
                cards.append(IssuedCard(uid, rule, 1, indicator, "order-select", f"h-{uid}", "ps", at, [], silent))
                if not silent and rng.random() < (0.55 if indicator != "critical" else 0.15):
                    feedback.append(FeedbackEntry(uid, "overridden", at + timedelta(minutes=2),
                                                  override_reason_code=rng.choice(reasons)))
                elif not silent and rng.random() < 0.5:
                    feedback.append(FeedbackEntry(uid, "accepted", at + timedelta(minutes=2), [f"{uid}-s"]))

    async def write() -> None:
        async with await Store.open(f"sqlite+aiosqlite:///{data_dir}/cds.sqlite3") as store:
            await store.record_cards(cards)
            await store.record_feedback(feedback)
    with ThreadPoolExecutor(1) as pool:  # playwright's sync API keeps an event loop running in this thread
        pool.submit(asyncio.run, write()).result()


def row_count(page: Page, rule: str, column: str) -> int:
    """The rule's count over all its versions (the seeded history may be of an earlier version)."""
    cells = page.locator(f'#rules tr[data-rule="{rule}"] td[data-col="{column}"]').all_inner_texts()
    return sum(int(c) for c in cells)


def test_order_for_a_pregnant_patient_then_review_it(page: Page, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    seed_history(data)
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(data)}) as svc:
        page.goto(svc.base_url + "/feedback/dashboard")
        overridden_before = row_count(page, "allergy-history", "overridden")
        accepted_before = row_count(page, "pregnancy", "accepted")

        page.goto(svc.base_url + "/demo")
        page.select_option("#patient-select", "synthea-pregnant")
        expect(page.locator("#summary-name")).to_be_visible()
        expect(page.locator("#summary-conditions")).to_contain_text("pregnancy")
        page.select_option("#area-select", "mesotherapy-face")
        page.locator('#products input[value="vitamins"]').check()
        draft = page.locator('#drafts li[data-ref="ServiceRequest/mesotherapy-draft-1"]')
        expect(draft).to_be_visible()
        critical = page.locator('.card[data-topic="pregnancy"][data-indicator="critical"]')
        expect(critical).to_be_visible()
        expect(critical).to_contain_text("Mesotherapy contraindicated: active pregnancy")
        expect(critical.locator(".detail strong").first).to_be_visible()  # Markdown rendered, not shown raw
        assert "**" not in critical.locator(".detail").inner_text()
        allergy = page.locator('.card[data-topic="allergy-history"]')
        expect(allergy).to_be_visible()
        expect(page.locator("#dev-request")).to_contain_text('"hook": "order-select"')
        expect(page.locator("#dev-response")).to_contain_text('"cards"')
        page.screenshot(path=str(shots(tmp_path) / "demo-ehr.png"), full_page=True)

        critical.locator("button.suggestion", has_text=REMOVE).click()
        expect(critical.locator(".feedback-status")).to_contain_text("Accepted")
        expect(draft).to_have_count(0)
        expect(page.locator("#drafts")).to_contain_text("No draft orders")

        reason = allergy.locator("select.override-reason")
        reason.select_option(label="Allergy or patch test done and negative")
        allergy.locator("input.override-comment").fill("patch test on 1 December")
        allergy.locator("button.override").click()
        expect(allergy.locator(".feedback-status")).to_contain_text("Overridden: Allergy or patch test done")

        page.goto(svc.base_url + "/feedback/dashboard")
        assert row_count(page, "allergy-history", "overridden") == overridden_before + 1
        assert row_count(page, "pregnancy", "accepted") == accepted_before + 1
        current = page.locator('#rules tr[data-rule="allergy-history"]').last  # rows by version: the live one
        expect(current).to_contain_text("Allergy or patch test done and negative")
        expect(page.locator("svg.chart g.week").first).to_be_attached()
        page.screenshot(path=str(shots(tmp_path) / "review-dashboard.png"), full_page=True)
        csv_text = httpx.get(svc.base_url + "/feedback/dashboard.csv").text
        assert "allergy-history" in csv_text


def test_sign_and_a_pasted_bundle(page: Page, tmp_path: Path) -> None:
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        page.goto(svc.base_url + "/demo")
        page.locator("#paste summary").click()
        page.fill("#bundle-text", '{"resourceType": "Patient"}')
        page.click("#bundle-load")
        expect(page.locator("#patient-error")).to_contain_text("not a Bundle")
        bundle = (ROOT / "fixtures" / "synthetic" / "carebundle-healthy-male.json").read_text()
        page.fill("#bundle-text", bundle)
        page.click("#bundle-load")
        expect(page.locator("#patient-error")).to_be_hidden()
        page.select_option("#area-select", "mesotherapy-scalp")
        expect(page.locator("#cards")).to_contain_text("No cards")
        page.click("#sign")
        expect(page.locator("#sign-status")).to_contain_text("1 order(s) signed")
        expect(page.locator("#dev-request")).to_contain_text('"hook": "order-sign"')


def dev(page: Page, part: str) -> str:
    """The developer panel's last request, response or URL (its text, shown or folded)."""
    return page.locator(f"#dev-{part}").text_content() or ""


def test_chart_opened_then_an_appointment_booked_for_a_pregnant_patient(page: Page, tmp_path: Path) -> None:
    """patient-view when the chart opens (nothing planned: no cards), appointment-book on booking (critical)."""
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        page.goto(svc.base_url + "/demo")
        page.select_option("#patient-select", "synthea-pregnant")
        expect(page.locator("#cds-hook")).to_contain_text("patient-view, HTTP 200")
        expect(page.locator("#dev-url")).to_contain_text("/cds-services/mesotherapy-patient-view")
        request = json.loads(dev(page, "request"))
        assert request["hook"] == "patient-view" and "draftOrders" not in request["context"]
        assert request["prefetch"]["plannedOrders"] == {"resourceType": "Bundle", "type": "searchset", "total": 0}
        assert request["prefetch"]["appointments"] == {"resourceType": "Bundle", "type": "searchset", "total": 0}
        assert request["prefetch"]["patient"]["resourceType"] == "Patient"
        assert json.loads(dev(page, "response")) == {"cards": []}
        expect(page.locator("#cards")).to_contain_text("No cards")

        page.select_option("#appointment-area", "mesotherapy-scalp")
        page.click("#book")
        expect(page.locator("#cds-hook")).to_contain_text("appointment-book, HTTP 200")
        critical = page.locator('.card[data-topic="pregnancy"][data-indicator="critical"]')
        expect(critical).to_be_visible()
        expect(critical).to_contain_text("Mesotherapy contraindicated: active pregnancy")
        request = json.loads(dev(page, "request"))
        assert request["hook"] == "appointment-book"
        assert dev(page, "url").endswith("/cds-services/mesotherapy-appointment-book")
        [entry] = request["context"]["appointments"]["entry"]
        appointment = entry["resource"]
        assert appointment["resourceType"] == "Appointment" and appointment["status"] == "proposed"
        assert appointment["serviceType"][0]["coding"][0]["code"] == "mesotherapy-scalp"
        assert "Mesotherapy" in appointment["description"] and "scalp" in appointment["description"]
        assert "plannedOrders" in request["prefetch"]
        response = json.loads(dev(page, "response"))
        assert "critical" in [c["indicator"] for c in response["cards"]]
        proposed = page.locator(f'#appointments li[data-ref="Appointment/{appointment["id"]}"]')
        expect(proposed).to_have_attribute("data-status", "proposed")
        expect(page.locator("#book-status")).to_contain_text("accept a suggestion or override each")
        page.screenshot(path=str(shots(tmp_path) / "demo-appointment-book.png"), full_page=True)

        critical.locator("button.suggestion", has_text="Remove the proposed mesotherapy appointment").click()
        expect(critical.locator(".feedback-status")).to_contain_text("Accepted")
        expect(proposed).to_have_count(0)
        assert dev(page, "url").endswith("/cds-services/mesotherapy-appointment-book/feedback")

        page.select_option("#appointment-area", "mesotherapy-scalp")  # a man with nothing to report books at once
        page.select_option("#patient-select", "carebundle-healthy-male")
        expect(page.locator("#cds-hook")).to_contain_text("patient-view, HTTP 200")
        page.click("#book")
        expect(page.locator("#book-status")).to_contain_text("1 appointment(s) booked")
        expect(page.locator('#appointments li[data-status="booked"]')).to_have_count(1)


def test_a_pasted_chart_with_a_booked_mesotherapy_shows_the_card_at_patient_view(page: Page, tmp_path: Path) -> None:
    bundle = json.loads((ROOT / "fixtures" / "synthetic" / "synthea-pregnant.json").read_text())
    [patient] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    day = (datetime.now(UTC) + timedelta(days=10)).date().isoformat()
    booked = {"resourceType": "Appointment", "id": "apt-booked", "status": "booked", "description": "Mesotherapy, face",
              "start": f"{day}T10:00:00Z", "participant": [{"actor": {"reference": f"Patient/{patient['id']}"},
                                                            "status": "accepted"}]}
    cancelled = {**booked, "id": "apt-cancelled", "status": "cancelled"}
    bundle["entry"] += [{"resource": booked}, {"resource": cancelled}]
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        page.goto(svc.base_url + "/demo")
        page.locator("#paste summary").click()
        page.fill("#bundle-text", json.dumps(bundle))
        page.click("#bundle-load")
        expect(page.locator("#cds-hook")).to_contain_text("patient-view, HTTP 200")
        critical = page.locator('.card[data-topic="pregnancy"][data-indicator="critical"]')
        expect(critical).to_be_visible()
        request = json.loads(dev(page, "request"))
        assert [e["resource"]["id"] for e in request["prefetch"]["appointments"]["entry"]] == ["apt-booked"]
        assert request["prefetch"]["plannedOrders"]["total"] == 0
        assert critical.locator("button.suggestion", has_text="Remove").count() == 0  # no draft to change


def test_the_demo_is_off_unless_enabled(tmp_path: Path) -> None:
    with Service({"CDS_ENV": "dev", "CDS_DEMO": "false", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        assert httpx.get(svc.base_url + "/demo").status_code == 404
        assert httpx.get(svc.base_url + "/demo/api/patients").status_code == 404


def test_record_text_is_shown_as_text_never_as_html(page: Page, tmp_path: Path) -> None:
    hostile = '<img src=x onerror="window.pwned=1"> [click](javascript:window.pwned=2) **bold** `x`'
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1970-01-01",
                      "name": [{"text": hostile}]}},
        {"resource": {"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "Patient/p1"},
                      "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": hostile}}}]}
    with Service({"CDS_ENV": "dev", "CDS_DATA_DIR": str(tmp_path)}) as svc:
        page.goto(svc.base_url + "/demo")
        page.locator("#paste summary").click()
        page.fill("#bundle-text", json.dumps(bundle))
        page.click("#bundle-load")
        page.select_option("#area-select", "mesotherapy-face")
        card = page.locator('.card[data-topic="allergy-history"]')
        expect(card).to_contain_text('<img src=x onerror="window.pwned=1">')  # shown as the text it is
        expect(page.locator("#summary-name")).to_contain_text("<img")
        assert page.locator("#cards img, #summary img").count() == 0
        assert page.locator('a[href^="javascript"]').count() == 0
        assert page.evaluate("window.pwned") is None
