"""Which draft orders are mesotherapy, where they treat, and which ingredients they inject.

Reads any FHIR version's order shape (R4/R5 ServiceRequest, MedicationRequest, STU3/DSTU2
ProcedureRequest, MedicationOrder) from raw JSON; an unknown shape is simply not a mesotherapy order.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from ..errors import InvalidRequest
from ..fhir.json import (
    MEMO_CHARS,
    Coded,
    coded,
    concept_chars,
    fold,
    listed,
    parse_date,
    ref_key,
    reference,
    text_limit,
)
from ..knowledge.loader import KnowledgeBase, Match, Orderable
from .record import medication_code


class Ingredient:
    """An ingredient an order injects. Per-request classes here have an explicit `__init__` (see `record.Fact`)."""

    __slots__ = ("id", "source")

    def __init__(self, id: str, source: str) -> None:
        self.id = id
        self.source = source  # where it came from: "MedicationRequest/mr-1", "order details", "default formulation"


class Order:
    """A mesotherapy being decided on: a draft order (order hooks), or a planned order or appointment."""

    __slots__ = ("ref", "label", "matched", "sites", "ingredients", "explicit_ingredients", "kind", "when", "status",
                 "based_on")

    def __init__(self, ref: str, label: str, matched: Match, sites: set[str], kind: str = "draft",
                 when: date | None = None, status: str = "", based_on: str = "") -> None:
        self.ref = ref
        self.label = label
        self.matched = matched
        self.sites = sites  # empty: treatment site unknown
        self.ingredients: list[Ingredient] = []
        self.explicit_ingredients = False
        self.kind = kind  # "draft" (draftOrders), "order" (a planned ServiceRequest), "appointment"
        self.when = when  # the planned date, when known
        self.status = status  # the planned order's or appointment's status
        self.based_on = based_on  # an appointment's ServiceRequest that made it a mesotherapy, if any


class DraftOrders:
    """The draftOrders Bundle: `Type/id` -> resource, and the entries' fullUrls (urn:uuid, absolute) -> `Type/id`."""

    __slots__ = ("resources", "aliases")

    def __init__(self, resources: dict[str, dict[str, Any]], aliases: dict[str, str]) -> None:
        self.resources = resources
        self.aliases = aliases

    def resolve(self, ref: str) -> str | None:
        """The draft order a reference points at (relative, absolute, versioned or a fullUrl), if any."""
        if ref in self.aliases:
            return self.aliases[ref]
        key = ref_key(ref)
        return key if key in self.resources else None


def draft_resources(draft_orders: Any) -> DraftOrders:
    """Index the draftOrders Bundle (a missing Bundle.type is fine, as the sandbox and hook examples send it)."""
    if not isinstance(draft_orders, dict) or draft_orders.get("resourceType") != "Bundle":
        raise InvalidRequest("context.draftOrders must be a FHIR Bundle", expression="context.draftOrders")
    entries = draft_orders.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest("context.draftOrders.entry must be an array", expression="context.draftOrders.entry")
    drafts = DraftOrders({}, {})
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidRequest(f"draftOrders entry {i} has no resource",
                                 expression=f"context.draftOrders.entry[{i}]")
        rid = resource.get("id")
        key = f"{resource['resourceType']}/{rid}" if isinstance(rid, str) and rid else f"#entry{i}"
        drafts.resources[key] = resource
        if isinstance(entry.get("fullUrl"), str):
            drafts.aliases[entry["fullUrl"]] = key
    return drafts


def evaluated_orders(hook: str, drafts: DraftOrders, selections: list[str] | None) -> list[str]:
    """order-select: only the selected orders; order-sign: all draft orders."""
    if hook != "order-select":
        return list(drafts.resources)
    chosen: list[str] = []
    for i, sel in enumerate(selections or []):
        key = drafts.resolve(sel)
        if key is None:
            raise InvalidRequest(f"selection {sel!r} is not an entry of draftOrders",
                                 expression=f"context.selections[{i}]")
        chosen.append(key)
    return chosen


def order_concepts(resource: dict[str, Any]) -> Coded:
    """Code, code.text, displays and orderDetail of an order, whatever its FHIR version."""
    c = coded(resource.get("code"))
    for key in ("medicationCodeableConcept", "productCodeableConcept", "medication"):
        value = resource.get(key)
        if isinstance(value, dict) and "reference" not in value:
            c = c.merged(coded(value))
    for detail in listed(resource.get("orderDetail")):
        if not isinstance(detail, dict):
            continue
        c = c.merged(coded(detail))
        for param in listed(detail.get("parameter")):  # R5 orderDetail.parameter[].value[x]
            if isinstance(param, dict):
                for k, v in param.items():
                    if k.startswith("value"):
                        c = c.merged(coded(v))
    return c


def _notes(resource: dict[str, Any]) -> list[str]:
    return [n["text"] for n in listed(resource.get("note")) if isinstance(n, dict) and isinstance(n.get("text"), str)]


def find_mesotherapy(kb: KnowledgeBase, hook: str, drafts: DraftOrders,
                     selections: list[str] | None) -> list[Order]:
    keys = evaluated_orders(hook, drafts, selections)
    selected = set(keys) if hook == "order-select" else set()
    orders: list[Order] = []
    for key in keys:
        resource = drafts.resources[key]
        concepts = order_concepts(resource)
        hit = _mesotherapy_match(kb, concepts)
        if hit is None:
            continue
        match, orderable = hit
        order = Order(ref=key, label=concepts.label, matched=match,
                      sites=_order_sites(kb, resource, concepts, orderable))
        _ingredients(kb, order, resource, concepts, orderable, drafts, selected)
        orders.append(order)
    return orders


def _mesotherapy_match(kb: KnowledgeBase, concepts: Coded) -> tuple[Match, Orderable | None] | None:
    o = kb.orderables
    for c in concepts.codings:
        if c.system == o.system:
            for orderable in o.orderables:
                if orderable.code == c.code:
                    return Match("code", f"{c.code} {c.display}".strip()), orderable
        for extra in o.other_codes:
            if extra.system == c.system and extra.code == c.code:
                return Match("code", f"{c.system}|{c.code} {c.display}".strip()), None
    texts = concepts.all_texts()
    for text in texts:
        found = kb.orderable_text.search(text)
        if found:
            if _not_the_procedure(kb, texts):
                return None
            return Match("text", found), None
    return None


def _not_the_procedure(kb: KnowledgeBase, texts: list[str]) -> bool:
    """An order named as a leaflet or a consultation alone is not the procedure; one that also names a session, a
    package, a follow-up, an injection or a product is (when in doubt, screen)."""
    if kb.orderable_exclude is None:
        return False
    folded = [fold(t) for t in texts]
    if not any(kb.orderable_exclude.search(t) for t in folded):
        return False
    if kb.orderable_procedure is not None and any(kb.orderable_procedure.search(t) for t in folded):
        return False
    return not ingredients_in(kb, Coded((), tuple(texts)))


def _links(resource: dict[str, Any], drafts: DraftOrders, *fields: str) -> set[str]:
    return {key for f in fields for item in listed(resource.get(f))
            if (r := reference(item)) and (key := drafts.resolve(r)) is not None}


def _linked_medications(resource: dict[str, Any], key: str, drafts: DraftOrders,
                        selected: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Draft MedicationRequests that belong to this order: basedOn/supportingInfo links either way, the same
    requisition or groupIdentifier, or (order-select) selected together with it and linked to nothing else."""
    own_links = _links(resource, drafts, "basedOn", "supportingInfo", "replaces")

    def ident(res: dict[str, Any], k: str) -> tuple[Any, Any] | None:
        v = res.get(k)
        return (v.get("system"), v.get("value")) if isinstance(v, dict) and v.get("value") else None

    found = []
    for other_key, other in drafts.resources.items():
        if other_key == key or other.get("resourceType") not in ("MedicationRequest", "MedicationOrder"):
            continue
        their_links = _links(other, drafts, "basedOn")
        same_group = any(ident(resource, k) and ident(resource, k) == ident(other, k)
                         for k in ("requisition", "groupIdentifier"))
        chosen_together = key in selected and other_key in selected and not their_links
        if other_key in own_links or key in their_links or same_group or chosen_together:
            found.append((other_key, other))
    return found


def _ingredients(kb: KnowledgeBase, order: Order, resource: dict[str, Any], concepts: Coded,
                 orderable: Orderable | None, drafts: DraftOrders, selected: set[str]) -> None:
    seen: set[str] = set()

    def add(ids: set[str], source: str) -> None:
        for ing in sorted(ids - seen):
            seen.add(ing)
            order.ingredients.append(Ingredient(ing, source))

    if resource.get("resourceType") in ("MedicationRequest", "MedicationOrder"):
        add(ingredients_in(kb, medication_code(resource)), order.ref)
    for med_key, med in _linked_medications(resource, order.ref, drafts, selected):
        add(ingredients_in(kb, medication_code(med)), med_key)
    details = concepts.merged(Coded((), tuple(_notes(resource))))
    add(ingredients_in(kb, details), "order details")
    order.explicit_ingredients = bool(seen)
    if not seen:
        default = (orderable.formulation if orderable and orderable.formulation
                   else kb.orderables.default_formulation)
        add(set(default), "default formulation")


def ingredients_in(kb: KnowledgeBase, value: Coded) -> set[str]:
    """Ingredient ids named by code or by a synonym in a medication concept or free text (memoised per concept)."""
    key = (value.codings, value.texts)
    known = kb.ingredient_memo.get(key)
    if known is None:
        found = {kb.ingredient_codes[(c.system, c.code)] for c in value.codings
                 if (c.system, c.code) in kb.ingredient_codes}
        texts = value.all_texts()
        for ing_id, matcher in kb.ingredient_text:
            if ing_id not in found and any(matcher.search(t) for t in texts):
                found.add(ing_id)
        for ing_id in list(found):  # "vitamin B12" names vitamin B12, not also the unspecified vitamins
            members = kb.ingredients[ing_id].members
            if members and found.intersection(members):
                found.discard(ing_id)
        known = frozenset(found)
        chars = concept_chars(value)
        if chars <= text_limit():  # a long text is matched on its first part and never memoised
            if len(kb.ingredient_memo) >= 50_000 or _MEMO_CHARS[0] + chars > MEMO_CHARS:
                kb.ingredient_memo.clear()
                _MEMO_CHARS[0] = 0
            kb.ingredient_memo[key] = known
            _MEMO_CHARS[0] += chars
    return set(known)


_MEMO_CHARS = [0]  # characters of the concepts in `KnowledgeBase.ingredient_memo`


def _order_sites(kb: KnowledgeBase, resource: dict[str, Any], concepts: Coded,
                 orderable: Orderable | None) -> set[str]:
    body = coded(resource.get("bodySite"))
    for dosage in listed(resource.get("dosageInstruction")):
        if isinstance(dosage, dict):
            body = body.merged(coded(dosage.get("site")))
    sites = kb.sites.classify(body)
    if sites:
        return sites
    if orderable is not None and orderable.site:
        return {orderable.site}
    return kb.sites.classify(concepts)


# ---------------------------------------------------------------- planned procedures (patient-view, appointment-book)

PLANNED_ORDER_STATUSES = ("active", "draft")
PLANNED_APPOINTMENT_STATUSES = ("proposed", "pending", "booked")
_NOT_PLANNED = ("cancelled", "entered-in-error", "noshow", "fulfilled", "revoked", "completed")


def _bundle_resources(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """`Type/id` -> resource for a Bundle (or a single resource) in the request's context."""
    if isinstance(value, dict) and value.get("resourceType") != "Bundle" and isinstance(value.get("resourceType"), str):
        value = {"resourceType": "Bundle", "entry": [{"resource": value}]}
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        raise InvalidRequest(f"{where} must be a FHIR Bundle", expression=where)
    entries = value.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest(f"{where}.entry must be an array", expression=f"{where}.entry")
    resources = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidRequest(f"{where} entry {i} has no resource", expression=f"{where}.entry[{i}]")
        resources.append(resource)
    return _keyed(resources)


def _keyed(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(resources):
        rid = r.get("id")
        out[f"{r['resourceType']}/{rid}" if isinstance(rid, str) and rid else f"#{r['resourceType']}{i}"] = r
    return out


def _order_date(resource: dict[str, Any]) -> date | None:
    for key in ("occurrenceDateTime", "start"):
        if (d := parse_date(resource.get(key))) is not None:
            return d
    period = resource.get("occurrencePeriod") or resource.get("requestedPeriod")
    for p in listed(period):
        if isinstance(p, dict) and (d := parse_date(p.get("start"))) is not None:
            return d
    return None


def _in_window(when: date | None, today: date, lookahead_days: int | None) -> bool:
    """Undated plans are screened; dated ones from today up to the look-ahead (None: any future date)."""
    if when is None:
        return True
    if when < today:
        return False
    return lookahead_days is None or when <= today + timedelta(days=lookahead_days)


def _service_request_order(kb: KnowledgeBase, key: str, resource: dict[str, Any], pool: DraftOrders,
                           kind: str) -> Order | None:
    concepts = order_concepts(resource)
    hit = _mesotherapy_match(kb, concepts)
    if hit is None:
        return None
    match, orderable = hit
    order = Order(ref=key, label=concepts.label, matched=match, sites=_order_sites(kb, resource, concepts, orderable),
                  kind=kind, when=_order_date(resource), status=str(resource.get("status") or ""))
    _ingredients(kb, order, resource, concepts, orderable, pool, set())
    return order


def appointment_concepts(resource: dict[str, Any]) -> Coded:
    """serviceType, appointmentType, reasonCode (R5 reason), serviceCategory, specialty and the description."""
    c = Coded()
    for key in ("serviceType", "appointmentType", "reasonCode", "reason", "serviceCategory", "specialty"):
        c = c.merged(coded(resource.get(key)))
    texts = tuple(t for t in (resource.get("description"),) if isinstance(t, str) and t.strip())
    return c.merged(Coded((), texts))


def _appointment_order(kb: KnowledgeBase, key: str, resource: dict[str, Any], pool: DraftOrders) -> Order | None:
    """An appointment for mesotherapy: by its own codes and text, or by the ServiceRequest it is based on."""
    concepts = appointment_concepts(resource)
    hit = _mesotherapy_match(kb, concepts)
    linked: Order | None = None
    for item in listed(resource.get("basedOn")):
        r = reference(item)
        sr_key = pool.resolve(r) if r else None
        if sr_key is not None:
            linked = _service_request_order(kb, sr_key, pool.resources[sr_key], pool, "order")
            if linked is not None:
                break
    if hit is None and linked is None:
        return None
    label = linked.label if hit is None and linked is not None else concepts.label
    if hit is not None:
        match, orderable = hit
        sites = _order_sites(kb, resource, concepts, orderable)
    else:
        assert linked is not None
        match, sites = linked.matched, set()
    order = Order(ref=key, label=label, matched=match, sites=sites or (linked.sites if linked else set()),
                  kind="appointment", when=_order_date(resource), status=str(resource.get("status") or ""),
                  based_on=linked.ref if linked else "")
    if linked is not None:
        order.ingredients, order.explicit_ingredients = linked.ingredients, linked.explicit_ingredients
    else:
        _ingredients(kb, order, resource, concepts, hit[1] if hit else None, DraftOrders({}, {}), set())
    return order


def planned_mesotherapy(kb: KnowledgeBase, service_requests: list[dict[str, Any]],
                        appointments: list[dict[str, Any]], today: date, lookahead_days: int) -> list[Order]:
    """patient-view: mesotherapy planned for the patient, as an active/draft ServiceRequest or a proposed, pending
    or booked Appointment, dated from today to `lookahead_days` ahead (undated plans count)."""
    requests = {k: r for k, r in _keyed(service_requests).items() if r.get("resourceType") == "ServiceRequest"}
    pool = DraftOrders({**requests, **_keyed([r for r in appointments if r.get("resourceType") != "Appointment"])},
                       {})
    orders: list[Order] = []
    for key, resource in _keyed(appointments).items():
        if resource.get("resourceType") != "Appointment" \
                or resource.get("status") not in PLANNED_APPOINTMENT_STATUSES:
            continue
        order = _appointment_order(kb, key, resource, pool)
        if order is not None and _in_window(order.when, today, lookahead_days):
            orders.append(order)
    booked_requests = {o.based_on for o in orders}
    for key, resource in requests.items():
        if key in booked_requests or resource.get("status") not in PLANNED_ORDER_STATUSES:
            continue  # an order already shown through its appointment is named once
        order = _service_request_order(kb, key, resource, pool, "order")
        if order is not None and _in_window(order.when, today, lookahead_days):
            orders.append(order)
    return orders


def booking_resources(appointments: Any) -> dict[str, dict[str, Any]]:
    """appointment-book: the context.appointments Bundle, `Type/id` -> resource."""
    return _bundle_resources(appointments, "context.appointments")


def booked_mesotherapy(kb: KnowledgeBase, booking: dict[str, dict[str, Any]],
                       service_requests: list[dict[str, Any]]) -> list[Order]:
    """appointment-book: the appointments being booked that are for mesotherapy (their basedOn ServiceRequest is
    looked up among the booking's own entries, then among the patient's planned orders)."""
    pool = DraftOrders({**_keyed([r for r in service_requests if r.get("resourceType") == "ServiceRequest"]),
                        **booking}, {})
    orders = []
    for key, resource in booking.items():
        if resource.get("resourceType") != "Appointment" or resource.get("status") in _NOT_PLANNED:
            continue
        order = _appointment_order(kb, key, resource, pool)
        if order is not None:
            orders.append(order)
    return orders


def unresolved_based_on(booking: dict[str, dict[str, Any]]) -> bool:
    """Does an appointment of the booking name a ServiceRequest that is not in the booking itself?"""
    pool = DraftOrders(booking, {})
    return any(r.get("resourceType") == "Appointment" and (ref := reference(item)) is not None
               and pool.resolve(ref) is None
               for r in booking.values() for item in listed(r.get("basedOn")))
