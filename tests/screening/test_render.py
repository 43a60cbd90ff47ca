"""Cards from findings (cds/screening/render.py): the shape each hook gets, record text escaped, ids injected."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from cds.fhir.client import entries
from cds.fhir.prefetch import Gathered
from cds.knowledge.loader import KnowledgeBase
from cds.knowledge.policy import ClinicalPolicy
from cds.screening.orders import Order, draft_resources, find_mesotherapy
from cds.screening.record import build_record
from cds.screening.render import card, first_sentences, md, new_uuid7
from cds.screening.rules import Finding, evaluate

from conftest import dev_settings, load_fixture
from scenarios import assert_no_empty_values

BASE = "https://cds.example"


def screened(kb: KnowledgeBase, name: str) -> tuple[list[Finding], list[Order], str]:
    """The findings and orders of a prefetch scenario, through the public steps of the pipeline."""
    request = load_fixture(f"scenarios/{name}.json")["request"]
    context = request["context"]
    drafts = draft_resources(context["draftOrders"])
    orders = find_mesotherapy(kb, request["hook"], drafts, context.get("selections"))
    data = {k: entries(v) if v.get("resourceType") == "Bundle" else [v] for k, v in request["prefetch"].items() if v}
    record = build_record(Gathered(data, {}, set(), []), context["patientId"], set(drafts.resources))
    today = datetime.now(UTC).date()
    return evaluate(kb, record, orders, today, ClinicalPolicy.from_settings(dev_settings())), orders, record.patient.id


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"id-{next(counter)}"


@pytest.fixture(scope="module")
def pregnant(kb: KnowledgeBase) -> tuple[list[Finding], list[Order], str]:
    return screened(kb, "pregnancy-active-condition-snomed")


def test_an_order_hook_card(kb: KnowledgeBase, pregnant: tuple[list[Finding], list[Order], str]) -> None:
    findings, orders, patient = pregnant
    finding = next(f for f in findings if f.rule.id == "pregnancy")
    c = card(finding, orders, kb, BASE, patient, new_uuid=ids(), hook="order-select")
    assert_no_empty_values(c)
    assert c["indicator"] == finding.indicator == "critical"
    assert c["summary"] == finding.rule.summary.get("critical", finding.rule.summary[finding.rule.indicator])
    assert c["source"]["topic"]["code"] == "pregnancy" and c["source"]["url"] == f"{BASE}/knowledge/pregnancy"
    assert c["links"] == [{"label": f"About this check: {finding.rule.title} (rule v{finding.rule.version})",
                           "url": f"{BASE}/knowledge/pregnancy", "type": "absolute"}]
    remove = c["suggestions"][0]
    assert remove["label"] == "Remove the mesotherapy order"
    assert [a["resourceId"] for a in remove["actions"]] == [o.ref for o in orders]
    assert c["selectionBehavior"] == "at-most-one"
    every_id = [c["uuid"], *(s["uuid"] for s in c["suggestions"])]
    assert sorted(every_id) == sorted(f"id-{i}" for i in range(len(every_id)))  # all from the injected source
    assert c["detail"].startswith("**Found:**") and "**Why:**" in c["detail"] and "**What to do:**" in c["detail"]
    assert {r["code"] for r in c["overrideReasons"]} == set(finding.rule.override_reasons)


def test_appointment_book_offers_a_consultation_and_patient_view_no_change(
        kb: KnowledgeBase, pregnant: tuple[list[Finding], list[Order], str]) -> None:
    findings, orders, patient = pregnant
    booking = card(findings[0], orders, kb, BASE, patient, hook="appointment-book")
    labels = [s["label"] for s in booking["suggestions"]]
    assert labels[:2] == ["Remove the proposed mesotherapy appointment", "Book a consultation first"]
    consult = booking["suggestions"][1]["actions"][0]["resource"]
    assert consult["participant"][0]["actor"] == {"reference": f"Patient/{patient}"}
    view = card(findings[0], orders, kb, BASE, patient, hook="patient-view")
    assert all(s["label"] not in labels[:2] for s in view.get("suggestions", []))


def test_record_text_is_escaped_for_markdown() -> None:
    assert md("*bold* <script> [link](x) `code` #1 a|b") == r"\*bold\* \<script\> \[link\](x) \`code\` \#1 a\|b"
    assert md("x" * 300 + "_") == "x" * 300 + r"\_"  # long texts bypass the cache, same escaping


def test_the_why_is_cut_to_two_short_sentences() -> None:
    assert first_sentences("One. Two is here.  Three.") == "One. Two is here."
    long = "First sentence. " + "Second " * 60 + "sentence."
    assert first_sentences(long) == "First sentence."


def test_card_ids_are_time_ordered_uuid7() -> None:
    a, b = new_uuid7(), new_uuid7()
    assert uuid.UUID(a).version == 7 and a != b
