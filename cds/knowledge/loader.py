"""Load and validate the clinical knowledge in cards/: rules, value sets, orderables, ingredients, body sites.

Everything is checked strictly at start-up (unknown fields, dangling names, duplicate ids, summaries of
140 characters or more) and compiled once into sets and prefix tables for fast matching.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, KnowledgeError
from ..fhir.json import ICD10CM
from .index import (
    Match,
    MatchIndex,
    SiteTable,
    TextMatcher,
    ValueSet,
    abbreviation_pattern,
    icd_key,
    phrases,
    prefix_table,
    system_uri,
    union_pattern,
)
from .policy import ClinicalPolicy
from .schema import (
    INDICATOR_RANK,
    SUMMARY_LIMIT,
    AllergyLeaf,
    AnyNode,
    BodySitesFile,
    ConditionLeaf,
    IncompleteLeaf,
    Indicator,
    Ingredient,
    IngredientAllergyLeaf,
    IngredientClass,
    IngredientsFile,
    Leaf,
    LeafUse,
    MedicationLeaf,
    ObservationLeaf,
    ObservationSpec,
    Orderable,
    OrderablesFile,
    OverrideReason,
    PostpartumLeaf,
    PostpartumSpec,
    PregnancyUnknownLeaf,
    Rule,
    ServiceFile,
    TextFile,
    ValueSetFile,
    WeanedLeaf,
)
from .yamlread import read_yaml

__all__ = [
    "INDICATOR_RANK", "SUMMARY_LIMIT", "AllergyLeaf", "AnyNode", "ConditionLeaf", "IncompleteLeaf", "Indicator",
    "IngredientAllergyLeaf", "KnowledgeBase", "Match", "MedicationLeaf", "ObservationLeaf", "ObservationSpec",
    "Orderable", "PostpartumLeaf", "PostpartumSpec", "PregnancyUnknownLeaf", "Rule", "WeanedLeaf", "load_knowledge",
]


@dataclass(slots=True)
class KnowledgeBase:
    service: ServiceFile
    rules: list[Rule]  # in evaluation order
    valuesets: dict[str, ValueSet]
    orderables: OrderablesFile
    orderable_text: TextMatcher
    orderable_exclude: re.Pattern[str] | None
    orderable_procedure: re.Pattern[str] | None
    ingredients: dict[str, Ingredient]
    ingredient_classes: dict[str, IngredientClass]
    ingredient_codes: dict[tuple[str, str], str]
    ingredient_text: list[tuple[str, TextMatcher]]
    class_text: list[tuple[str, TextMatcher]]
    sites: SiteTable
    override_reasons: dict[str, OverrideReason]
    index: MatchIndex
    by_id: dict[str, Rule] = field(default_factory=dict)
    ingredient_memo: dict[tuple[Any, ...], frozenset[str]] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)  # built from the rules on first use (rules, render)
    silent: frozenset[str] = frozenset()  # rules computed, recorded and counted, never returned (silent mode)

    def vs(self, name: str) -> ValueSet:
        return self.valuesets[name]

    def status(self, rule: Rule) -> str:
        """The rule's status in this deployment: `silent` or `active` after the settings' overrides."""
        if rule.id in self.silent:
            return "silent"
        return "active" if rule.status == "silent" else rule.status

    def without(self, ids: Iterable[str]) -> KnowledgeBase:
        """The same knowledge with some rules left out (what clinicians see while those rules run silent)."""
        gone = set(ids)
        rules = [r for r in self.rules if r.id not in gone]
        return replace(self, rules=rules, by_id={r.id: r for r in rules}, derived={}, silent=frozenset())

    def with_overrides(self, silent: Iterable[str] = (), active: Iterable[str] = ()) -> KnowledgeBase:
        """Apply a deployment's silent-mode settings (CDS_SILENT_RULES, CDS_ACTIVE_RULES); ConfigError on an
        unknown rule id or a rule named in both."""
        silent, active = set(silent), set(active)
        unknown = sorted((silent | active) - set(self.by_id))
        if unknown:
            raise ConfigError(f"CDS_SILENT_RULES/CDS_ACTIVE_RULES name unknown rule(s): {', '.join(unknown)}")
        both = sorted(silent & active)
        if both:
            raise ConfigError(f"rule(s) both silent and active in the settings: {', '.join(both)}")
        self.silent = frozenset((self.silent | silent) - active)
        return self


def _read_yaml(path: Path) -> Any:
    try:
        # libyaml's parser where present, and the generated code lists (thousands of entries) read line by line
        return read_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KnowledgeError(f"{path}: cannot read YAML: {exc}") from exc


def _parse(model: type[BaseModel], path: Path) -> Any:
    try:
        return model.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise KnowledgeError(f"{path}: {exc}") from exc


def load_knowledge(directory: Path, *, env: str = "dev") -> KnowledgeBase:
    """Read cards/, validate every file and every cross-reference, and compile matchers."""
    if not directory.is_dir():
        raise KnowledgeError(f"knowledge directory {directory} does not exist")
    text_file: TextFile = _parse(TextFile, directory / "text.yaml")
    neg_before = re.compile("|".join(text_file.negation_before))
    neg_after = re.compile("|".join(text_file.negation_after))

    def matcher(patterns: Iterable[str], exclude: Iterable[str] = (), abbreviations: Iterable[str] = ()) -> TextMatcher:
        return TextMatcher(union_pattern(patterns), neg_before, neg_after, union_pattern(exclude),
                           abbreviation_pattern(abbreviations))

    valuesets: dict[str, ValueSet] = {}
    for path in sorted((directory / "valuesets").glob("*.yaml")):
        vs: ValueSetFile = _parse(ValueSetFile, path)
        if vs.id != path.stem:
            raise KnowledgeError(f"{path}: id {vs.id!r} must equal the file name")
        try:
            valuesets[vs.id] = ValueSet(
                id=vs.id,
                title=vs.title,
                codes={(system_uri(c.system), icd_key(c.code) if system_uri(c.system) == ICD10CM else c.code): c.display
                       for c in vs.codes},
                prefixes=prefix_table(vs.prefixes),
                excluded=frozenset((system_uri(c.system), c.code) for c in vs.exclude_codes),
                excluded_prefixes=prefix_table(vs.exclude_prefixes),
                text=matcher(vs.text, vs.exclude_text, vs.abbreviations),
                about_relatives=vs.about_relatives,
            )
        except re.error as exc:
            raise KnowledgeError(f"{path}: bad text pattern: {exc}") from exc

    index = MatchIndex(valuesets)

    service: ServiceFile = _parse(ServiceFile, directory / "service.yaml")
    _check_visible("service.yaml", [service.title, service.description, service.usage_requirements,
                                    service.source_label, *service.sources,
                                    *(r.display for r in service.override_reasons)])
    reasons = {r.code: r for r in service.override_reasons}

    orderables: OrderablesFile = _parse(OrderablesFile, directory / "orderables.yaml")
    ingredients_file: IngredientsFile = _parse(IngredientsFile, directory / "ingredients.yaml")
    ingredients = _unique({i.id: i for i in ingredients_file.ingredients}, ingredients_file.ingredients, "ingredient")
    classes = {c.id: c for c in ingredients_file.classes}
    for ing in ingredients.values():
        if ing.ingredient_class and ing.ingredient_class not in classes:
            raise KnowledgeError(f"ingredients.yaml: {ing.id} names unknown class {ing.ingredient_class!r}")
        for member in ing.members:
            if member not in ingredients or ingredients[member].members:
                raise KnowledgeError(f"ingredients.yaml: group {ing.id} names {member!r}, not a single ingredient")
    for name in orderables.default_formulation + [f for o in orderables.orderables for f in o.formulation]:
        if name not in ingredients:
            raise KnowledgeError(f"orderables.yaml: formulation names unknown ingredient {name!r}")

    sites_file: BodySitesFile = _parse(BodySitesFile, directory / "bodysites.yaml")
    areas = {s.id: s for s in sites_file.areas}
    for s in areas.values():
        if s.within and s.within not in areas:
            raise KnowledgeError(f"bodysites.yaml: {s.id} lies within unknown site {s.within!r}")
    for o in orderables.orderables:
        if o.site and o.site not in areas:
            raise KnowledgeError(f"orderables.yaml: {o.code} names unknown site {o.site!r}")
    for prefix, site in sites_file.icd_prefix_sites.items():
        if site not in areas:
            raise KnowledgeError(f"bodysites.yaml: ICD prefix {prefix} names unknown site {site!r}")
    sites = SiteTable(
        areas=areas,
        codes={(system_uri(c.system), c.code): s.id for s in areas.values() for c in s.codes},
        text=[(s.id, p) for s in areas.values() if (p := union_pattern(phrases(s.text))) is not None],
        icd_prefixes=sorted(((icd_key(k), v) for k, v in sites_file.icd_prefix_sites.items()),
                            key=lambda kv: -len(kv[0])),
    )

    rules: list[Rule] = []
    for path in sorted((directory / "rules").glob("*.yaml")):
        rule: Rule = _parse(Rule, path)
        if rule.id != path.stem:
            raise KnowledgeError(f"{path}: id {rule.id!r} must equal the file name")
        if rule.status == "retired" or (rule.status == "draft" and env == "prod"):
            continue
        rules.append(rule)
    by_id = _unique({r.id: r for r in rules}, rules, "rule")
    for rule in rules:
        _check_rule(rule, valuesets, reasons, by_id)

    kb = KnowledgeBase(
        service=service,
        rules=_evaluation_order(rules),
        valuesets=valuesets,
        orderables=orderables,
        orderable_text=matcher(orderables.text),
        orderable_exclude=union_pattern(orderables.exclude_text),
        orderable_procedure=union_pattern(orderables.procedure_text),
        ingredients=ingredients,
        ingredient_classes=classes,
        ingredient_codes={(system_uri(c.system), c.code): i.id for i in ingredients.values() for c in i.codes},
        ingredient_text=[(i.id, matcher(phrases(i.synonyms))) for i in ingredients.values()],
        class_text=[(c.id, matcher(phrases(c.synonyms))) for c in classes.values() if c.synonyms],
        sites=sites,
        override_reasons=reasons,
        index=index,
        by_id=by_id,
        silent=frozenset(r.id for r in rules if r.status == "silent"),
    )
    return kb

def _unique(mapping: dict[str, Any], items: list[Any], what: str) -> dict[str, Any]:
    if len(mapping) != len(items):
        dupes = [key for key, n in Counter(i.id for i in items).items() if n > 1]
        raise KnowledgeError(f"duplicate {what} id(s): {', '.join(sorted(set(dupes)))}")
    return mapping


def leaves(node: Any) -> Iterable[Leaf]:
    """Every leaf under a node of a rule's `when`."""
    if isinstance(node, AnyNode):
        for child in node.any:
            yield from leaves(child)
    else:
        yield node


def leaf_use(leaf: Leaf, where: str = "a rule") -> LeafUse:
    """What a leaf declares it uses; KnowledgeError (the service does not start) for a leaf that declares nothing."""
    try:
        return leaf.uses()
    except NotImplementedError as exc:
        raise KnowledgeError(f"{where}: {exc}; describe it (knowledge/schema.py) before using it") from None


# User-visible text names sources as a reader would look them up: never a file name, never the word "seed".
_INTERNAL_NAME = re.compile(r"\bseeds?\b|\b[\w-]+\.(?:txt|ya?ml|json|md|py|html?)\b", re.IGNORECASE)


def _check_visible(where: str, texts: Iterable[str]) -> None:
    for text in texts:
        if (m := _INTERNAL_NAME.search(text)) is not None:
            raise KnowledgeError(f"{where}: user-visible text names {m.group(0)!r}; cite sources by the "
                                 "article's name (see cards/README.md)")


def _check_rule(rule: Rule, valuesets: dict[str, ValueSet], reasons: dict[str, OverrideReason],
                by_id: dict[str, Rule]) -> None:
    where = f"rules/{rule.id}.yaml"
    _check_visible(where, [rule.title, rule.rationale, rule.advice, rule.extension or "", rule.source.citation,
                           rule.source.quote, *rule.summary.values(), *(s.label for s in rule.suggestions)])
    for leaf in leaves(rule.when):
        use = leaf_use(leaf, where)
        for name in use.valuesets:
            if name not in valuesets:
                raise KnowledgeError(f"{where}: unknown value set {name!r}")
        for name in use.policy:
            if name not in ClinicalPolicy.NAMES:  # the settings a rule may name are the clinical policy's
                raise KnowledgeError(f"{where}: unknown setting {name!r}")
    for code in rule.override_reasons:
        if code not in reasons:
            raise KnowledgeError(f"{where}: unknown override reason {code!r}")
    for other in rule.suppressed_by + rule.excludes_evidence_of:
        if other not in by_id:
            raise KnowledgeError(f"{where}: refers to unknown rule {other!r}")
    for s in rule.suggestions:
        if s.create is not None:
            _check_created_resource(where, s.create.resource)


def _check_created_resource(where: str, resource: dict[str, Any]) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    candidate = {**resource, "subject": {"reference": "Patient/example"}}
    try:
        get_fhir_model_class(resource.get("resourceType", "")).model_validate(candidate)
    except (ValidationError, KeyError, ValueError) as exc:
        raise KnowledgeError(f"{where}: suggested resource is not valid R4: {exc}") from exc


def _evaluation_order(rules: list[Rule]) -> list[Rule]:
    """Rules that others depend on (suppressed_by, excludes_evidence_of) run first."""
    by_id = {r.id: r for r in rules}
    ordered: list[Rule] = []
    state: dict[str, int] = {}

    def visit(rule: Rule) -> None:
        if state.get(rule.id) == 2:
            return
        if state.get(rule.id) == 1:
            raise KnowledgeError(f"rules/{rule.id}.yaml: circular suppressed_by/excludes_evidence_of")
        state[rule.id] = 1
        for dep in rule.suppressed_by + rule.excludes_evidence_of:
            visit(by_id[dep])
        state[rule.id] = 2
        ordered.append(rule)

    for rule in rules:
        visit(rule)
    return ordered
