"""Evaluate the knowledge base's rules against a patient's record and the mesotherapy orders.

Pure and synchronous: no I/O, no web framework. Each rule yields at most one Finding, carrying the evidence
(the records that made it fire) so that the card can cite them.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Literal

from ..errors import KnowledgeError
from ..knowledge.index import ValueSet
from ..knowledge.loader import (
    INDICATOR_RANK,
    AllergyLeaf,
    AnyNode,
    ConditionLeaf,
    IncompleteLeaf,
    IngredientAllergyLeaf,
    KnowledgeBase,
    MedicationLeaf,
    ObservationLeaf,
    ObservationSpec,
    PostpartumLeaf,
    PostpartumSpec,
    PregnancyUnknownLeaf,
    Rule,
    WeanedLeaf,
    leaf_use,
)
from ..knowledge.policy import ClinicalPolicy
from ..knowledge.schema import ANY, AllergySpec, ConditionSpec, Indicator, IngredientAllergySpec, WeanedSpec
from .orders import Order, ingredients_in
from .record import AllergyFact, Fact, ObservationFact, PatientRecord


class Evidence:
    """A record that made a rule fire, as the card cites it.

    Evidence, Finding and Evaluation are plain classes with an explicit `__init__`, not dataclasses: mypyc
    compiles an explicit `__init__`, a dataclass's generated one stays interpreted (see `record.Fact`).
    """

    __slots__ = ("ref", "what", "matched", "status", "when", "indicator", "notes", "raw", "supporting")

    def __init__(self, ref: str, what: str, matched: str, status: str = "", when: date | None = None,
                 indicator: Indicator = "warning", notes: list[str] | None = None, raw: dict[str, Any] | None = None,
                 supporting: bool = False) -> None:
        self.ref = ref
        self.what = what
        self.matched = matched  # "code (SNOMED CT 77386006 Pregnant)", "text (Pregnant)", or "" when notes say it all
        self.status = status
        self.when = when
        self.indicator = indicator
        self.notes: list[str] = notes if notes is not None else []
        self.raw = raw
        self.supporting = supporting  # listed when the rule fires for another record; never fires it alone


class Finding:
    __slots__ = ("rule", "indicator", "evidence", "notes")

    def __init__(self, rule: Rule, indicator: Indicator, evidence: list[Evidence],
                 notes: list[str] | None = None) -> None:
        self.rule = rule
        self.indicator = indicator
        self.evidence = evidence
        self.notes: list[str] = notes if notes is not None else []


class AnyPlan:
    """An `any` node of a rule plan: its children, compiled."""

    __slots__ = ("children",)

    def __init__(self, children: list[Any]) -> None:
        self.children = children


class ObservationPlan:
    """An observation leaf's spec with its value sets looked up, as `Evaluation._observation` reads it."""

    __slots__ = ("vs_ids", "max_age_setting", "ignore", "superseded_by_delivery", "answer", "boolean",
                 "quantity_above", "quantity_units", "due_date", "gestational_age", "indicator")

    def __init__(self, kb: KnowledgeBase, spec: ObservationSpec) -> None:
        self.vs_ids = [kb.vs(code).id for code in (spec.code, *spec.with_codes)]
        self.max_age_setting = spec.max_age_setting
        self.ignore = kb.vs(spec.ignore_answers) if spec.ignore_answers else None
        self.superseded_by_delivery = spec.superseded_by_delivery
        self.answer = kb.vs(spec.answer) if spec.answer else None
        self.boolean = spec.boolean
        self.quantity_above = spec.quantity_above
        self.quantity_units = list(spec.quantity_units)
        self.due_date = spec.due_date
        self.gestational_age = spec.gestational_age
        self.indicator: Indicator | None = spec.indicator


class ConditionPlan:
    """A condition leaf's spec with its value sets looked up, as `Evaluation._conditions` reads it (its rule's
    indicator too, when the leaf sets none)."""

    __slots__ = ("vs", "not_in", "history", "indicator", "recent_days_setting", "recent_indicator", "acute",
                 "site", "site_unknown_indicator")

    def __init__(self, kb: KnowledgeBase, spec: ConditionSpec, rule_indicator: Indicator) -> None:
        self.vs = kb.vs(spec.in_)
        self.not_in = [kb.vs(n) for n in spec.not_in]
        self.history = spec.history
        self.indicator: Indicator = spec.indicator or rule_indicator
        recent = spec.recent
        self.recent_days_setting = recent.days_setting if recent is not None else None
        self.recent_indicator: Indicator = recent.indicator if recent is not None else self.indicator
        self.acute = kb.vs(recent.in_) if recent is not None and recent.in_ is not None else None
        self.site = spec.site
        self.site_unknown_indicator: Indicator = spec.site_unknown_indicator


class AllergyPlan:
    """An allergy leaf's spec with its value sets looked up, as `Evaluation._allergies` reads it."""

    __slots__ = ("no_known", "severe", "severe_indicator", "non_immune", "environmental", "indicator")

    def __init__(self, kb: KnowledgeBase, spec: AllergySpec, rule_indicator: Indicator) -> None:
        self.no_known = kb.vs(spec.no_known)
        self.severe = kb.vs(spec.critical_manifestations)
        self.severe_indicator: Indicator = spec.severe_indicator
        self.non_immune = kb.vs(spec.non_immune) if spec.non_immune else None
        self.environmental = kb.vs(spec.environmental) if spec.environmental else None
        self.indicator: Indicator = rule_indicator


class IngredientAllergyPlan:
    """An ingredient-allergy leaf's spec, as `Evaluation._ingredient_allergies` reads it."""

    __slots__ = ("no_known", "related_indicator")

    def __init__(self, kb: KnowledgeBase, spec: IngredientAllergySpec) -> None:
        self.no_known = kb.vs(spec.no_known)
        self.related_indicator: Indicator = spec.related_indicator


class WeanedPlan:
    """A weaning leaf's spec with its value sets looked up, as `Evaluation._weaned` reads it."""

    __slots__ = ("conditions", "observation", "feeding_answers", "weaned_answers")

    def __init__(self, kb: KnowledgeBase, spec: WeanedSpec) -> None:
        self.conditions = kb.vs(spec.conditions)
        self.observation = kb.vs(spec.observation)
        self.feeding_answers = kb.vs(spec.feeding_answers)
        self.weaned_answers = kb.vs(spec.weaned_answers)


def compile_node(kb: KnowledgeBase, node: Any, rule_indicator: Indicator) -> Any:
    """A rule's condition as `Evaluation._node` reads it: `any` nodes and the leaves evaluated on every hook call in
    native form (plans), the other leaves as they are."""
    if isinstance(node, AnyNode):
        return AnyPlan([compile_node(kb, child, rule_indicator) for child in node.any])
    if isinstance(node, ConditionLeaf):
        return ConditionPlan(kb, node.condition, rule_indicator)
    if isinstance(node, ObservationLeaf):
        return ObservationPlan(kb, node.observation)
    if isinstance(node, AllergyLeaf):
        return AllergyPlan(kb, node.allergy, rule_indicator)
    if isinstance(node, IngredientAllergyLeaf):
        return IngredientAllergyPlan(kb, node.ingredient_allergy)
    if isinstance(node, WeanedLeaf):
        return WeanedPlan(kb, node.weaned)
    return node


class _RulePlan:
    """What `Evaluation.run` reads of a rule, read from the rule once per knowledge base: reading an attribute of a
    pydantic model goes through pydantic's `__getattr__` hook, several times the cost of a native attribute, and
    the rules' fields were read for every rule of every hook call."""

    __slots__ = ("rule", "id", "when", "need", "suppressed_by", "excludes")

    def __init__(self, kb: KnowledgeBase, rule: Rule, need: Needs) -> None:
        self.rule = rule
        self.id = rule.id
        self.when: Any = compile_node(kb, rule.when, rule.indicator)
        self.need = NeedPlan(need) if need is not None else None
        self.suppressed_by: list[str] = list(rule.suppressed_by)
        self.excludes: list[str] = list(rule.excludes_evidence_of)


INDEXED_KINDS = ("conditions", "observations", "medications")  # the record's facts found by value set


class NeedPlan:
    """A rule's needs (`rule_needs`) as `Evaluation.holds` asks them: whether any allergy, or any data not obtained,
    suffices, and per indexed kind the value sets any one of which does."""

    __slots__ = ("allergies", "unavailable", "sets")

    def __init__(self, need: frozenset[tuple[str, str]]) -> None:
        self.allergies = ("allergies", ANY) in need
        self.unavailable = ("unavailable", ANY) in need
        self.sets = [(kind, ids) for kind in INDEXED_KINDS
                     if (ids := frozenset(v for k, v in need if k == kind and v != ANY))]


def rule_plans(kb: KnowledgeBase) -> list[_RulePlan]:
    """The rules in evaluation order, as `Evaluation.run` reads them (built on first use, kept in `kb.derived`)."""
    plans: list[_RulePlan] | None = kb.derived.get("rule_plans")
    if plans is None:
        needs = rule_needs(kb)
        plans = kb.derived["rule_plans"] = [_RulePlan(kb, rule, needs[rule.id]) for rule in kb.rules]
    return plans


def worst(levels: list[Indicator]) -> Indicator:
    """The most severe level (the first of them, on a tie, as max() gives)."""
    found = levels[0]
    for level in levels:
        if INDICATOR_RANK[level] > INDICATOR_RANK[found]:
            found = level
    return found



class Evaluation:
    __slots__ = ("kb", "record", "orders", "today", "policy", "findings", "_by_set", "_delivery", "_valuesets")

    def __init__(self, kb: KnowledgeBase, record: PatientRecord, orders: list[Order], today: date,
                 policy: ClinicalPolicy) -> None:
        self.kb = kb
        self.record = record
        self.orders = orders
        self.today = today
        self.policy = policy
        self.findings: dict[str, Finding] = {}
        self._by_set: dict[str, dict[str, list[Any]]] = {}
        self._delivery: tuple[date, Evidence] | Literal[False] | None = False  # not looked for yet
        self._valuesets = kb.valuesets

    def vs(self, name: str) -> ValueSet:
        """`kb.vs`, without a call into the (interpreted) knowledge base for each of a hook call's lookups."""
        return self._valuesets[name]

    def members(self, kind: str, vs_id: str) -> list[Any]:
        """Facts of one kind (conditions, observations, medications) in a value set."""
        return self._index(kind).get(vs_id, [])

    def _index(self, kind: str) -> dict[str, list[Any]]:
        index = self._by_set.get(kind)
        if index is None:
            index = self._by_set[kind] = {}
            matcher = self.kb.index
            for fact in getattr(self.record, kind):
                for hit in matcher.hits(fact.code):
                    index.setdefault(hit, []).append(fact)
        return index

    def run(self) -> list[Finding]:
        for plan in rule_plans(self.kb):
            if plan.need is not None and not self.holds(plan.need):
                continue  # nothing this rule reads is in the record
            if plan.suppressed_by and any(other in self.findings for other in plan.suppressed_by):
                continue
            excluded = {e.ref for other in plan.excludes if other in self.findings
                        for e in self.findings[other].evidence}
            evidence = [e for e in self._node(plan.rule, plan.when) if e.ref not in excluded]
            if any(not e.supporting for e in evidence):
                self.findings[plan.id] = self._finding(plan.rule, _dedupe(evidence))
        return sorted(self.findings.values(), key=lambda f: -INDICATOR_RANK[f.indicator])

    def holds(self, need: NeedPlan) -> bool:
        """Does the record hold any of a rule's needs? What `need.isdisjoint(self.present())` says of the needs as
        `rule_needs` gives them, without building the set."""
        record = self.record
        if (need.allergies and record.allergies) or (need.unavailable and record.unavailable):
            return True
        for kind, ids in need.sets:
            index = self._index(kind)
            if len(index) <= len(ids):
                for vs_id in index:  # the record's value sets of this kind: usually a few
                    if vs_id in ids:
                        return True
            elif any(vs_id in index for vs_id in ids):
                return True
        return False

    def present(self) -> set[tuple[str, str]]:
        """What the record holds, in the terms of `rule_needs`: `run` skips a rule whose needs are disjoint."""
        present = {(kind, vs_id) for kind in INDEXED_KINDS for vs_id in self._index(kind)}
        if self.record.allergies:
            present.add(("allergies", ANY))
        if self.record.unavailable:
            present.add(("unavailable", ANY))
        return present

    def _finding(self, rule: Rule, evidence: list[Evidence]) -> Finding:
        indicator = worst([e.indicator for e in evidence])
        notes = []
        if rule.verify_if_male and not self.record.patient.may_be_pregnant:
            indicator = "warning" if INDICATOR_RANK[indicator] > INDICATOR_RANK["warning"] else indicator
            notes.append("The patient's recorded sex is male: verify this record before acting on it.")
        if any("unconfirmed" in n for e in evidence for n in e.notes):
            notes.append("Some of the evidence is recorded as unconfirmed: confirm it with the patient.")
        return Finding(rule, indicator, evidence, notes)

    def evidence(self, rule: Rule) -> list[Evidence]:
        """What `rule`'s condition finds in the record, before suppression and exclusion by other rules."""
        return self._node(rule, compile_node(self.kb, rule.when, rule.indicator))

    # --- the grammar -----------------------------------------------------------------------------

    def _node(self, rule: Rule, node: Any) -> list[Evidence]:
        """`node` as `compile_node` gives it. Dispatched on the class with `is`: isinstance() against a pydantic
        model class runs the metaclass's __instancecheck__ in Python, which cost more than some leaves' evaluation.
        A subclass of a grammar leaf (none today) is dispatched as that leaf."""
        kind = type(node)
        if kind is AnyPlan:
            return [e for child in node.children for e in self._node(rule, child)]
        if kind is ConditionPlan:
            return self._conditions(node)
        if kind is ObservationPlan:
            return self._observation(rule, node)
        if kind is AllergyPlan:
            return self._allergies(node)
        if kind is IngredientAllergyPlan:
            return self._ingredient_allergies(node)
        if kind is WeanedPlan:
            return self._weaned(node)
        if kind not in _LEAVES:
            kind = next((k for k in kind.__mro__ if k in _LEAVES), kind)
        if kind is MedicationLeaf:
            return self._medications(rule, node)
        if kind is PregnancyUnknownLeaf:
            return self._pregnancy_unknown(node)
        if kind is IncompleteLeaf:
            return [Evidence(ref=what, what=what, matched="", status=why, indicator=rule.indicator)
                    for what, why in self.record.unavailable.items()]
        if kind is PostpartumLeaf:
            return self._postpartum(rule, node)
        raise TypeError(f"unknown rule node {type(node).__name__}")  # unreachable: the grammar is closed

    def _conditions(self, plan: ConditionPlan) -> list[Evidence]:
        vs, not_in, history, site = plan.vs, plan.not_in, plan.history, plan.site
        days_setting = plan.recent_days_setting
        window = self.policy.limit(days_setting) if days_setting is not None else 0
        acute_vs = plan.acute
        found = []
        for fact in self.members("conditions", vs.id):
            if not history and not fact.is_current(self.today):
                continue
            match = vs.match(fact.code)
            if match is None or any(n.match(fact.code) for n in not_in):
                continue
            indicator = plan.indicator
            notes = []
            if days_setting is not None:
                since = fact.onset or fact.recorded
                is_recent = since is not None and since >= self.today - timedelta(days=window)
                # An acute code left active for years is a stale record: "acute" decides only when undated.
                acute = (since is None and acute_vs is not None and fact.is_current(self.today)
                         and acute_vs.match(fact.code) is not None)
                if is_recent or acute:
                    indicator = plan.recent_indicator
                    notes.append(f"recent (within {window} days)" if is_recent else "recorded as acute and active")
            if site:
                where = self._site(fact, plan.site_unknown_indicator, indicator)
                if where is None:
                    continue
                indicator, note = where
                notes.append(note)
            found.append(self._evidence(fact, f"{match.by} ({match.what})", indicator, notes))
        return found

    def _site(self, fact: Fact, unknown: Indicator, known: Indicator) -> tuple[Indicator, str] | None:
        sites = self.kb.sites
        lesion = sites.classify(fact.body_site) or sites.classify(fact.code)  # "Laceration of forearm" names it
        results: list[tuple[Indicator, str]] = []
        for order in self.orders:
            if not lesion or not order.sites:
                side = "the lesion's site" if not lesion else "the order's treatment site"
                results.append((unknown, f"{side} is not recorded, so it may be in the treatment area"))
            elif sites.overlap(lesion, order.sites):
                results.append((known, f"site {', '.join(sorted(lesion))} is in the treatment area "
                                       f"({', '.join(sorted(order.sites))})"))
        if not results:
            return None  # a lesion elsewhere than every treatment area
        return max(results, key=lambda r: INDICATOR_RANK[r[0]])

    def _evidence(self, fact: Fact, matched: str, indicator: Indicator, notes: list[str]) -> Evidence:
        if fact.unconfirmed:
            notes = [*notes, "unconfirmed"]
        return Evidence(ref=fact.ref, what=fact.code.label, matched=matched, status=fact.status_text,
                        when=fact.onset or fact.recorded, indicator=indicator, notes=notes, raw=fact.raw)

    def _latest(self, codes: list[str], max_age_days: int, ignore: str | None = None) -> ObservationFact | None:
        """The latest Observation of these codes (value set names), if it is recent enough to be used; answers in
        `ignore` ("unknown") are no status, so the one before them counts."""
        return self._latest_in([self.vs(code).id for code in codes], max_age_days,
                               self.vs(ignore) if ignore else None)

    def _latest_in(self, vs_ids: list[str], max_age_days: int, skip: ValueSet | None) -> ObservationFact | None:
        latest: ObservationFact | None = None
        for vs_id in vs_ids:
            for o in self.members("observations", vs_id):
                # the first of the latest, as max() would pick; undated ones never count
                if o.when is None or (latest is not None and latest.when is not None and o.when <= latest.when):
                    continue
                if skip is not None and o.value_boolean is None and o.value_number is None \
                        and o.value_date is None and skip.match(o.value) is not None:
                    continue
                latest = o
        if latest is None or latest.when is None or latest.when.date() < self.today - timedelta(days=max_age_days):
            return None  # stale or undated: counts as unknown
        return latest

    def _observation(self, rule: Rule, spec: ObservationPlan) -> list[Evidence]:
        latest = self._latest_in(spec.vs_ids, self.policy.limit(spec.max_age_setting), spec.ignore)
        if latest is None:
            return []
        if spec.superseded_by_delivery:
            delivery = self.delivery()
            if delivery is not None and latest.when is not None and delivery[0] >= latest.when.date():
                return []  # a delivery recorded since: the pregnancy it spoke of has ended
        what = f"{latest.code.label}: {latest.value.label}"
        how = None
        match = spec.answer.match(latest.value) if spec.answer is not None else None
        if match is not None:
            how = f"answer {match.what}" if match.by == "code" else f"answer text \"{match.what}\""
        elif spec.boolean is not None and latest.value_boolean is spec.boolean:
            how = f"answer {str(spec.boolean).lower()}"
            what = f"{latest.code.label}: {how}"
        elif spec.quantity_above is not None and latest.value_number is not None and (
                not spec.quantity_units or latest.value_unit.lower() in spec.quantity_units) \
                and latest.value_number >= spec.quantity_above:
            how = f"result {latest.value_number:g} {latest.value_unit} (at or above {spec.quantity_above:g})"
            what = f"{latest.code.label}: {latest.value_number:g} {latest.value_unit}".strip()
        elif spec.due_date and latest.value_date is not None \
                and latest.value_date >= self.today - timedelta(days=DUE_DATE_GRACE_DAYS):
            how = f"estimated delivery date {latest.value_date}"
            what = f"{latest.code.label}: {latest.value_date}"
        elif spec.gestational_age and latest.value_number is not None and latest.when is not None:
            weeks = _weeks(latest.value_number, latest.value_unit)
            if weeks is not None and 0 < weeks < 45 and \
                    latest.when.date() + timedelta(weeks=42 - weeks) >= self.today:
                how = f"gestational age {weeks:g} weeks on {latest.when.date()}"
                what = f"{latest.code.label}: {latest.value_number:g} {latest.value_unit}".strip()
        if how is None:
            return []
        ev = Evidence(ref=latest.ref, what=what, matched=how, status=latest.status or "", when=latest.onset,
                      indicator=spec.indicator or rule.indicator, raw=latest.raw)
        return [ev]

    def delivery(self) -> tuple[date, Evidence] | None:
        """The latest delivery in the record: a postpartum or delivery Condition, the end of a pregnancy
        Condition, or an estimated delivery date passed more than the grace days ago. Looked for once."""
        if self._delivery is not False:
            return self._delivery
        spec = postpartum_spec(self.kb)
        found: tuple[date, Evidence] | None = None
        if spec is not None:
            for fact in self.members("conditions", spec.deliveries):
                day = fact.onset or fact.recorded or fact.abatement
                if day is not None and day <= self.today and (found is None or day > found[0]):
                    found = (day, self._evidence(fact, "delivery record", "warning", [f"delivery {day}"]))
            for fact in self.members("conditions", spec.pregnancies):
                day = fact.abatement
                if day is not None and day <= self.today and (found is None or day > found[0]):
                    found = (day, self._evidence(fact, "pregnancy ended", "warning", [f"pregnancy ended {day}"]))
            for obs in self.members("observations", spec.due_dates):
                day = obs.value_date
                if day is not None and day < self.today - timedelta(days=DUE_DATE_GRACE_DAYS) and (
                        found is None or day > found[0]):
                    found = (day, Evidence(obs.ref, f"{obs.code.label}: {day}", "due date passed", obs.status or "",
                                           obs.onset, "warning", [f"due {day}"], obs.raw))
        self._delivery = found
        return found

    def _medications(self, rule: Rule, leaf: MedicationLeaf) -> list[Evidence]:
        vs = self.vs(leaf.medication.in_)
        found = []
        for fact in self.members("medications", vs.id):
            if fact.ref in self.record.draft_ids:
                continue  # the orders being signed are not the patient's current medication
            match = vs.match(fact.code)
            if match is not None:
                found.append(self._evidence(fact, f"{match.by} ({match.what})",
                                            leaf.medication.indicator or rule.indicator, []))
        return found

    def _current_allergies(self, nka: ValueSet) -> list[AllergyFact]:
        return [a for a in self.record.allergies if a.is_current(self.today) and nka.match(a.code) is None]

    def _allergies(self, spec: AllergyPlan) -> list[Evidence]:
        severe, non_immune, environmental = spec.severe, spec.non_immune, spec.environmental
        found = []
        for fact in self._current_allergies(spec.no_known):
            if non_immune is not None and fact.kind == "intolerance" and fact.reactions and all(
                    non_immune.match(r) is not None for r in fact.reactions):
                continue  # an intolerance with only non-immune reactions (nausea, drowsiness) is no allergy
            notes = []
            indicator = spec.indicator
            if fact.criticality == "high":
                indicator, notes = spec.severe_indicator, ["criticality high"]
            if fact.severe:
                indicator = spec.severe_indicator
                notes.append("severe reaction")
            if (m := severe.match(fact.manifestations)) is not None:
                indicator = spec.severe_indicator
                notes.append(f"reaction: {m.what}")
            supporting = indicator != spec.severe_indicator and environmental is not None \
                and environmental.match(fact.agent) is not None
            if supporting:
                notes.append("inhaled environmental allergen: listed with the others, not a reason on its own")
            ev = self._evidence(fact, "", indicator, notes)
            ev.supporting = supporting
            found.append(ev)
        return found

    def _ingredient_allergies(self, spec: IngredientAllergyPlan) -> list[Evidence]:
        kb = self.kb
        found = []
        for fact in self._current_allergies(spec.no_known):
            agent = fact.agent
            allergens = ingredients_in(kb, agent)
            classes = {cid for cid, m in kb.class_text if any(m.search(t) for t in agent.all_texts())}
            best: tuple[Indicator, str] | None = None
            for order in self.orders:
                for ing in order.ingredients:
                    ingredient = kb.ingredients[ing.id]
                    source = f"{ingredient.display} in {order.ref} (from {ing.source})"
                    if ing.id in allergens:
                        hit: tuple[Indicator, str] = ("critical", f"allergen matches ordered ingredient {source}")
                    elif allergens.intersection(ingredient.members):  # a group ordered, one member allergen
                        named = sorted(allergens.intersection(ingredient.members))
                        names = ", ".join(kb.ingredients[a].display for a in named)
                        hit = (spec.related_indicator,
                               f"the ordered {ingredient.display} may include {names}: {source}")
                    elif any(ing.id in kb.ingredients[a].members for a in allergens):  # a group allergen
                        hit = (spec.related_indicator,
                               f"an allergy to a mix whose contents are not recorded may include ordered ingredient "
                               f"{source}")
                    elif ingredient.ingredient_class and ingredient.ingredient_class in classes:
                        hit = ("critical", f"allergy to the class of ordered ingredient {source}")
                    elif ingredient.ingredient_class and any(
                            kb.ingredients[a].ingredient_class == ingredient.ingredient_class for a in allergens):
                        cls = kb.ingredient_classes[ingredient.ingredient_class].display
                        hit = (spec.related_indicator,
                               f"related agent of the same class ({cls}) as ordered ingredient {source}: "
                               "possible cross-reactivity")
                    else:
                        continue
                    if best is None or INDICATOR_RANK[hit[0]] > INDICATOR_RANK[best[0]]:
                        best = hit
            if best is not None:
                found.append(self._evidence(fact, "", best[0], [best[1]]))
        return found

    def _weaned(self, spec: WeanedPlan) -> list[Evidence]:
        months = self.policy.weaning_wait_months
        cutoff = _months_before(self.today, months)
        found = []
        for fact in self.members("conditions", spec.conditions.id):
            if fact.abatement and cutoff < fact.abatement <= self.today:
                found.append(Evidence(fact.ref, fact.code.label, f"breastfeeding ended {fact.abatement}",
                                      fact.status_text, fact.abatement, "warning",
                                      [f"ended less than {months} months ago"], fact.raw))
        status_vs, yes, no = spec.observation, spec.feeding_answers, spec.weaned_answers
        series = sorted((o for o in self.members("observations", status_vs.id) if o.when),
                        key=lambda o: o.when)
        last_yes = None
        for i, obs in enumerate(series):
            if yes.match(obs.value) or obs.value_boolean is True:
                last_yes = i
        if last_yes is not None:
            for obs in series[last_yes + 1:]:
                if no.match(obs.value) or obs.value_boolean is False:
                    ended = obs.when.date()
                    if cutoff < ended <= self.today:
                        found.append(Evidence(obs.ref, f"{obs.code.label}: {obs.value.label}",
                                              "first \"not currently breastfeeding\" after breastfeeding",
                                              obs.status or "", ended, "warning",
                                              [f"ended less than {months} months ago"], obs.raw))
                    break
        return found

    def _pregnancy_unknown(self, leaf: PregnancyUnknownLeaf) -> list[Evidence]:
        spec = leaf.pregnancy_status_unknown
        patient = self.record.patient
        if not patient.may_be_pregnant:
            return []
        age = patient.age(self.today)
        s = self.policy
        if age is not None and not s.childbearing_age_min <= age <= s.childbearing_age_max:
            return []
        window = self.today - timedelta(days=s.pregnancy_status_max_age_days)
        for fact in self.members("conditions", spec.conditions):
            latest = max((d for d in (fact.abatement, fact.recorded, fact.onset) if d), default=None)
            if fact.is_current(self.today) or (latest and latest >= window):
                return []
        if self._latest([spec.observation, *spec.with_codes], s.pregnancy_status_max_age_days,
                        spec.ignore_answers) is not None:
            return []
        note = f"no pregnancy status or pregnancy record in the last {s.pregnancy_status_max_age_days} days"
        age_text = f"{age} years" if age is not None else "age not recorded"
        sex = patient.gender or "sex not recorded"
        if patient.gender == "male":
            sex = "male, with a female birth sex or sex for clinical use"
        return [Evidence(f"Patient/{patient.id}", f"{sex}, {age_text}", "patient demographics",
                         note, None, "info", [], None)]

    def _postpartum(self, rule: Rule, leaf: PostpartumLeaf) -> list[Evidence]:
        spec = leaf.postpartum
        if not self.record.patient.may_be_pregnant:
            return []
        delivery = self.delivery()
        if delivery is None:
            return []
        day, evidence = delivery
        months = self.policy.limit(spec.months_setting)
        if day < _months_before(self.today, months):
            return []
        for vs_id in spec.feeding:  # a breastfeeding record since the delivery answers the question
            for kind in ("conditions", "observations"):
                for fact in self.members(kind, self.vs(vs_id).id):
                    when = fact.onset or fact.recorded or fact.abatement
                    if when is not None and when >= day:
                        return []
        evidence.indicator = rule.indicator
        evidence.notes = [f"delivery on {day}, less than {months} months ago; breastfeeding not recorded since"]
        return [evidence]


def postpartum_spec(kb: KnowledgeBase) -> PostpartumSpec | None:
    """What counts as a delivery, from the knowledge's postpartum node (None when no rule has one)."""
    if "postpartum_spec" not in kb.derived:
        found = None
        for rule in kb.rules:
            stack: list[Any] = [rule.when]
            while stack:
                node = stack.pop()
                if isinstance(node, AnyNode):
                    stack.extend(node.any)
                elif isinstance(node, PostpartumLeaf):
                    found = node.postpartum
        kb.derived["postpartum_spec"] = found
    spec: PostpartumSpec | None = kb.derived["postpartum_spec"]
    return spec


DUE_DATE_GRACE_DAYS = 14  # an estimated delivery date passed by less than this: the pregnancy may go on


def _weeks(value: float, unit: str) -> float | None:
    """A gestational age in weeks, from weeks (wk, weeks, the default) or days (d, days)."""
    u = unit.strip().lower()
    if u in ("", "wk", "wks", "week", "weeks", "w", "{weeks}", "semanas", "semaines", "wochen", "tuan"):
        return value
    if u in ("d", "day", "days", "{days}", "dias", "jours", "tage", "ngay"):
        return value / 7
    return None


Needs = frozenset[tuple[str, str]] | None
# The leaf kinds `Evaluation._node` evaluates: a rule using any other is refused at start-up (`rule_needs`).
EVALUATED = (ConditionLeaf, ObservationLeaf, MedicationLeaf, AllergyLeaf, IngredientAllergyLeaf, WeanedLeaf,
             PregnancyUnknownLeaf, IncompleteLeaf, PostpartumLeaf)
# The leaves `Evaluation._node` takes as they are (the others are compiled into plans: `compile_node`).
_LEAVES = frozenset(EVALUATED) - {ConditionLeaf, ObservationLeaf, AllergyLeaf, IngredientAllergyLeaf, WeanedLeaf}


def rule_needs(kb: KnowledgeBase) -> dict[str, Needs]:
    """Per rule, what must be in a record for it to find anything: (record kind, value set id) pairs, any one of
    which suffices; None for a rule that can fire on an empty record (pregnancy status unknown fires on absence).

    Each leaf declares what it reads (`LeafUse.reads`, knowledge/schema.py) and finds evidence only among those
    facts, so a rule none of whose needs is present returns nothing, and is skipped without being evaluated.
    KnowledgeError for a leaf that declares nothing or that `Evaluation` does not evaluate: the screening calls
    this at start-up, so such a rule stops the service instead of being skipped.
    """
    needs = kb.derived.get("rule_needs")
    if needs is None:
        needs = kb.derived["rule_needs"] = {rule.id: _needs(kb, rule.when, f"rules/{rule.id}.yaml")
                                            for rule in kb.rules}
    return needs


def _needs(kb: KnowledgeBase, node: Any, where: str) -> Needs:
    if isinstance(node, AnyNode):
        parts = [_needs(kb, child, where) for child in node.any]
        known = [p for p in parts if p is not None]
        return None if len(known) < len(parts) else frozenset().union(*known)
    reads = leaf_use(node, where).reads
    if not isinstance(node, EVALUATED):
        raise KnowledgeError(f"{where}: the grammar leaf {type(node).__name__} is not evaluated by the rules")
    if reads is None:
        return None
    return frozenset((kind, name if name == ANY else kb.vs(name).id) for kind, name in reads)


def _dedupe(evidence: list[Evidence]) -> list[Evidence]:
    best: dict[str, Evidence] = {}
    for e in evidence:
        if e.ref not in best or INDICATOR_RANK[e.indicator] > INDICATOR_RANK[best[e.ref].indicator]:
            best[e.ref] = e
    return list(best.values())


def _months_before(day: date, months: int) -> date:
    year, month = divmod(day.month - 1 - months, 12)
    target_year, target_month = day.year + year, month + 1
    for d in (day.day, 30, 29, 28):
        try:
            return date(target_year, target_month, d)
        except ValueError:
            continue
    raise ValueError(day)  # unreachable


def evaluate(kb: KnowledgeBase, record: PatientRecord, orders: list[Order], today: date,
             policy: ClinicalPolicy) -> list[Finding]:
    return Evaluation(kb, record, orders, today, policy).run()
