"""Which draft orders are mesotherapy, where they treat, and which ingredients they inject.

Reads any FHIR version's order shape (R4/R5 ServiceRequest, MedicationRequest, STU3/DSTU2
ProcedureRequest, MedicationOrder) from raw JSON; an unknown shape is simply not a mesotherapy order.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest
from .fhirjson import MEMO_CHARS, Coded, coded, concept_chars, fold, listed, ref_key, reference, text_limit
from .knowledge import KnowledgeBase, Match, Orderable
from .record import medication_code


class Ingredient:
    """An ingredient an order injects. Per-request classes here have an explicit `__init__` (see `record.Fact`)."""

    __slots__ = ("id", "source")

    def __init__(self, id: str, source: str) -> None:
        self.id = id
        self.source = source  # where it came from: "MedicationRequest/mr-1", "order details", "default formulation"


class Order:
    __slots__ = ("ref", "label", "matched", "sites", "ingredients", "explicit_ingredients")

    def __init__(self, ref: str, label: str, matched: Match, sites: set[str]) -> None:
        self.ref = ref
        self.label = label
        self.matched = matched
        self.sites = sites  # empty: treatment site unknown
        self.ingredients: list[Ingredient] = []
        self.explicit_ingredients = False


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
