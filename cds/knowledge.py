"""Load and validate the clinical knowledge in cards/: rules, value sets, orderables, ingredients, body sites.

Everything is checked strictly at start-up (unknown fields, dangling names, duplicate ids, summaries of
140 characters or more) and compiled once into sets and prefix tables for fast matching.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import KnowledgeError
from .fhirjson import ICD10CM, LOINC, RXNORM, SNOMED, Coded, fold, norm_system

Indicator = Literal["info", "warning", "critical"]
INDICATOR_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
SUMMARY_LIMIT = 140  # CDS Hooks: summary "<140 characters"

SYSTEM_ALIASES = {
    "snomed": SNOMED,
    "loinc": LOINC,
    "icd10cm": ICD10CM,
    "rxnorm": RXNORM,
    "atc": "http://www.whocc.no/atc",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- value sets ---------------------------------------------------------------------------------

Verified = Literal["V", "V2", "derived", "local"]  # terminology reference marks; U codes never ship


class CodeEntry(Strict):
    system: str
    code: str
    display: str
    verified: Verified
    source: str | None = None


class PrefixEntry(Strict):
    system: str
    prefix: str
    display: str
    verified: Verified
    source: str | None = None


class ValueSetFile(Strict):
    id: str
    title: str
    provenance: str
    codes: list[CodeEntry] = []
    prefixes: list[PrefixEntry] = []
    text: list[str] = []
    exclude_codes: list[CodeEntry] = []
    exclude_prefixes: list[PrefixEntry] = []
    exclude_text: list[str] = []


def _system(name: str) -> str:
    return norm_system(SYSTEM_ALIASES.get(name, name))


def _icd_key(code: str) -> str:
    return code.replace(".", "").upper()


@dataclass(frozen=True, slots=True)
class Match:
    by: Literal["code", "text"]
    what: str  # "SNOMED 77386006 Pregnant" or the matched text


@dataclass(slots=True)
class TextMatcher:
    """Case- and accent-insensitive phrase search that ignores negated mentions."""

    pattern: re.Pattern[str] | None
    negation_before: re.Pattern[str]
    negation_after: re.Pattern[str]

    def search(self, text: str) -> str | None:
        if self.pattern is None:
            return None
        folded = fold(text)
        for m in self.pattern.finditer(folded):
            clause_start = max(folded.rfind(sep, 0, m.start()) for sep in (".", ";", ",", "|")) + 1
            before = folded[clause_start : m.start()]
            after_end = min([i for i in (folded.find(s, m.end()) for s in ".;,|") if i >= 0] or [len(folded)])
            after = folded[m.end() : after_end]
            if self.negation_before.search(before) or self.negation_after.search(after):
                continue
            return text
        return None


def _union(patterns: Iterable[str]) -> re.Pattern[str] | None:
    items = list(patterns)
    if not items:
        return None
    return re.compile("|".join(f"(?:{p})" for p in items))


@dataclass(slots=True)
class ValueSet:
    id: str
    title: str
    codes: dict[tuple[str, str], str]
    prefixes: dict[str, tuple[str, ...]]
    excluded: frozenset[tuple[str, str]]
    excluded_prefixes: dict[str, tuple[str, ...]]
    text: TextMatcher
    exclude_text: re.Pattern[str] | None

    def _code_hit(self, system: str, code: str, codes: Any, prefixes: dict[str, tuple[str, ...]]) -> bool:
        if (system, code) in codes:
            return True
        table = prefixes.get(system)
        if table:
            key = _icd_key(code) if system == ICD10CM else code
            return key.startswith(table)
        return False

    def match(self, value: Coded) -> Match | None:
        """Match by code first; else by text (code.text and displays) with negations ignored."""
        for c in value.codings:
            if c.code and self._code_hit(c.system, c.code, self.excluded, self.excluded_prefixes):
                return None
        for c in value.codings:
            if not c.code:
                continue
            key = (c.system, _icd_key(c.code) if c.system == ICD10CM else c.code)
            if key in self.codes or self._code_hit(c.system, c.code, (), self.prefixes):
                return Match("code", f"{_system_label(c.system)} {c.code} {c.display}".strip())
        for text in value.all_texts():
            if self.exclude_text is not None and self.exclude_text.search(fold(text)):
                continue
            hit = self.text.search(text)
            if hit:
                return Match("text", hit)
        return None


def _system_label(system: str) -> str:
    return {SNOMED: "SNOMED CT", LOINC: "LOINC", ICD10CM: "ICD-10-CM", RXNORM: "RxNorm"}.get(system, system)


# --- orderables, ingredients, body sites --------------------------------------------------------

class Orderable(Strict):
    code: str
    display: str
    site: str | None = None
    formulation: list[str] = []


class OrderablesFile(Strict):
    system: str
    orderables: list[Orderable]
    other_codes: list[CodeEntry] = []
    text: list[str]
    exclude_text: list[str] = []
    default_formulation: list[str]


class IngredientClass(Strict):
    id: str
    display: str
    synonyms: list[str] = []


class Ingredient(Strict):
    id: str
    display: str
    ingredient_class: str | None = Field(default=None, alias="class")
    codes: list[CodeEntry] = []
    synonyms: list[str]


class IngredientsFile(Strict):
    classes: list[IngredientClass] = []
    ingredients: list[Ingredient]


class BodySite(Strict):
    id: str
    display: str
    within: str | None = None
    codes: list[CodeEntry] = []
    text: list[str] = []


class BodySitesFile(Strict):
    areas: list[BodySite]
    icd_prefix_sites: dict[str, str] = {}


class TextFile(Strict):
    negation_before: list[str]
    negation_after: list[str]


class OverrideReason(Strict):
    code: str
    display: str


class ServiceFile(Strict):
    title: str
    description: str
    usage_requirements: str
    source_label: str
    topic_system: str
    override_reason_system: str
    override_reasons: list[OverrideReason]


# --- rules: a closed grammar ----------------------------------------------------------------------

class Recent(Strict):
    days_setting: str
    indicator: Indicator
    in_: str | None = Field(default=None, alias="in")


class ConditionSpec(Strict):
    in_: str = Field(alias="in")
    not_in: list[str] = []
    history: bool = False
    indicator: Indicator | None = None
    recent: Recent | None = None
    site: bool = False  # compare with the order's treatment site
    site_unknown_indicator: Indicator = "warning"


class ObservationSpec(Strict):
    code: str
    answer: str
    boolean: bool | None = None
    max_age_setting: str
    indicator: Indicator | None = None


class MedicationSpec(Strict):
    in_: str = Field(alias="in")
    indicator: Indicator | None = None


class AllergySpec(Strict):
    no_known: str
    critical_manifestations: str
    severe_indicator: Indicator = "critical"


class IngredientAllergySpec(Strict):
    no_known: str
    related_indicator: Indicator = "warning"


class WeanedSpec(Strict):
    conditions: str
    observation: str
    feeding_answers: str
    weaned_answers: str


class PregnancyUnknownSpec(Strict):
    conditions: str
    observation: str
    genders: list[str] = ["female"]


class IncompleteSpec(Strict):
    pass


class ConditionLeaf(Strict):
    condition: ConditionSpec


class ObservationLeaf(Strict):
    observation: ObservationSpec


class MedicationLeaf(Strict):
    medication: MedicationSpec


class AllergyLeaf(Strict):
    allergy: AllergySpec


class IngredientAllergyLeaf(Strict):
    ingredient_allergy: IngredientAllergySpec


class WeanedLeaf(Strict):
    weaned: WeanedSpec


class PregnancyUnknownLeaf(Strict):
    pregnancy_status_unknown: PregnancyUnknownSpec


class IncompleteLeaf(Strict):
    screening_incomplete: IncompleteSpec


class AnyNode(Strict):
    any: list[Node]


def _node_kind(value: Any) -> str | None:
    """A node is a one-key mapping; its key names its kind (`any`, `condition`, `observation`, ...)."""
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


Node = Annotated[
    Annotated[AnyNode, Tag("any")]
    | Annotated[ConditionLeaf, Tag("condition")]
    | Annotated[ObservationLeaf, Tag("observation")]
    | Annotated[MedicationLeaf, Tag("medication")]
    | Annotated[AllergyLeaf, Tag("allergy")]
    | Annotated[IngredientAllergyLeaf, Tag("ingredient_allergy")]
    | Annotated[WeanedLeaf, Tag("weaned")]
    | Annotated[PregnancyUnknownLeaf, Tag("pregnancy_status_unknown")]
    | Annotated[IncompleteLeaf, Tag("screening_incomplete")],
    Discriminator(_node_kind),
]
AnyNode.model_rebuild()


class Source(Strict):
    citation: str
    seed: str
    quote: str


class CreateAction(Strict):
    description: str
    resource: dict[str, Any]


class SuggestionSpec(Strict):
    label: str
    create: CreateAction | None = None


class Rule(Strict):
    id: str
    version: int = Field(ge=1)
    status: Literal["active", "draft", "retired"]
    title: str
    indicator: Indicator
    extension: str | None = None
    summary: dict[Indicator, str]
    when: Node
    verify_if_male: bool = False
    suppressed_by: list[str] = []
    excludes_evidence_of: list[str] = []
    rationale: str
    advice: str
    source: Source
    suggestions: list[SuggestionSpec] = []
    override_reasons: list[str]

    @model_validator(mode="after")
    def _summaries(self) -> Rule:
        if self.indicator not in self.summary:
            raise ValueError(f"summary has no text for the rule's own indicator {self.indicator!r}")
        for level, text in self.summary.items():
            if len(text) >= SUMMARY_LIMIT:
                raise ValueError(f"summary[{level}] is {len(text)} characters; CDS Hooks needs < 140")
        return self


# --- the loaded knowledge base ------------------------------------------------------------------

@dataclass(slots=True)
class SiteTable:
    areas: dict[str, BodySite]
    codes: dict[tuple[str, str], str]
    text: list[tuple[str, re.Pattern[str]]]
    icd_prefixes: list[tuple[str, str]]

    def lineage(self, site: str) -> set[str]:
        """A site with every site it lies within (scalp -> {scalp, head})."""
        out = {site}
        while (parent := self.areas[site].within) is not None:
            out.add(parent)
            site = parent
        return out

    def overlap(self, a: set[str], b: set[str]) -> bool:
        """True when some site of `a` lies within some site of `b`, or the other way round."""
        return any(x in self.lineage(y) or y in self.lineage(x) for x in a for y in b)

    def classify(self, value: Coded) -> set[str]:
        """Treatment-area sites named by codes or words in `value` (empty: none recognised)."""
        found = {self.codes[(c.system, c.code)] for c in value.codings if (c.system, c.code) in self.codes}
        for c in value.codings:
            if c.system == ICD10CM and c.code:
                key = _icd_key(c.code)
                for prefix, site in self.icd_prefixes:
                    if key.startswith(prefix):
                        found.add(site)
                        break
        if not found:
            for text in value.all_texts():
                folded = fold(text)
                found.update(site for site, pattern in self.text if pattern.search(folded))
        return found


@dataclass(slots=True)
class KnowledgeBase:
    service: ServiceFile
    rules: list[Rule]  # in evaluation order
    valuesets: dict[str, ValueSet]
    orderables: OrderablesFile
    orderable_text: TextMatcher
    orderable_exclude: re.Pattern[str] | None
    ingredients: dict[str, Ingredient]
    ingredient_classes: dict[str, IngredientClass]
    ingredient_codes: dict[tuple[str, str], str]
    ingredient_text: list[tuple[str, TextMatcher]]
    class_text: list[tuple[str, TextMatcher]]
    sites: SiteTable
    override_reasons: dict[str, OverrideReason]
    negation: TextFile
    by_id: dict[str, Rule] = field(default_factory=dict)

    def vs(self, name: str) -> ValueSet:
        return self.valuesets[name]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KnowledgeError(f"{path}: cannot read YAML: {exc}") from exc


def _parse(model: type[BaseModel], path: Path) -> Any:
    try:
        return model.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise KnowledgeError(f"{path}: {exc}") from exc


def _word_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    return _union(_phrases(words))


def load_knowledge(directory: Path, *, env: str = "dev") -> KnowledgeBase:
    """Read cards/, validate every file and every cross-reference, and compile matchers."""
    if not directory.is_dir():
        raise KnowledgeError(f"knowledge directory {directory} does not exist")
    text_file: TextFile = _parse(TextFile, directory / "text.yaml")
    neg_before = re.compile("|".join(text_file.negation_before))
    neg_after = re.compile("|".join(text_file.negation_after))

    def matcher(patterns: Iterable[str]) -> TextMatcher:
        return TextMatcher(_union(patterns), neg_before, neg_after)

    valuesets: dict[str, ValueSet] = {}
    for path in sorted((directory / "valuesets").glob("*.yaml")):
        vs: ValueSetFile = _parse(ValueSetFile, path)
        if vs.id != path.stem:
            raise KnowledgeError(f"{path}: id {vs.id!r} must equal the file name")
        try:
            valuesets[vs.id] = ValueSet(
                id=vs.id,
                title=vs.title,
                codes={(_system(c.system), _icd_key(c.code) if _system(c.system) == ICD10CM else c.code): c.display
                       for c in vs.codes},
                prefixes=_prefix_table(vs.prefixes),
                excluded=frozenset((_system(c.system), c.code) for c in vs.exclude_codes),
                excluded_prefixes=_prefix_table(vs.exclude_prefixes),
                text=matcher(vs.text),
                exclude_text=_union(vs.exclude_text),
            )
        except re.error as exc:
            raise KnowledgeError(f"{path}: bad text pattern: {exc}") from exc

    service: ServiceFile = _parse(ServiceFile, directory / "service.yaml")
    reasons = {r.code: r for r in service.override_reasons}

    orderables: OrderablesFile = _parse(OrderablesFile, directory / "orderables.yaml")
    ingredients_file: IngredientsFile = _parse(IngredientsFile, directory / "ingredients.yaml")
    ingredients = _unique({i.id: i for i in ingredients_file.ingredients}, ingredients_file.ingredients, "ingredient")
    classes = {c.id: c for c in ingredients_file.classes}
    for ing in ingredients.values():
        if ing.ingredient_class and ing.ingredient_class not in classes:
            raise KnowledgeError(f"ingredients.yaml: {ing.id} names unknown class {ing.ingredient_class!r}")
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
        codes={(_system(c.system), c.code): s.id for s in areas.values() for c in s.codes},
        text=[(s.id, p) for s in areas.values() if (p := _word_pattern(s.text)) is not None],
        icd_prefixes=sorted(((_icd_key(k), v) for k, v in sites_file.icd_prefix_sites.items()),
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
        orderable_exclude=_union(orderables.exclude_text),
        ingredients=ingredients,
        ingredient_classes=classes,
        ingredient_codes={(_system(c.system), c.code): i.id for i in ingredients.values() for c in i.codes},
        ingredient_text=[(i.id, matcher(_phrases(i.synonyms))) for i in ingredients.values()],
        class_text=[(c.id, matcher(_phrases(c.synonyms))) for c in classes.values() if c.synonyms],
        sites=sites,
        override_reasons=reasons,
        negation=text_file,
        by_id=by_id,
    )
    return kb


def _phrases(words: Iterable[str]) -> list[str]:
    return [r"\b" + re.escape(fold(w)) for w in words]


def _prefix_table(entries: Iterable[PrefixEntry]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for p in entries:
        system = _system(p.system)
        table.setdefault(system, []).append(_icd_key(p.prefix) if system == ICD10CM else p.prefix)
    return {k: tuple(v) for k, v in table.items()}


def _unique(mapping: dict[str, Any], items: list[Any], what: str) -> dict[str, Any]:
    if len(mapping) != len(items):
        seen: set[str] = set()
        dupes = [i.id for i in items if i.id in seen or seen.add(i.id)]  # type: ignore[func-returns-value]
        raise KnowledgeError(f"duplicate {what} id(s): {', '.join(sorted(set(dupes)))}")
    return mapping


def _leaf_valuesets(node: Any) -> Iterable[str]:
    if isinstance(node, AnyNode):
        for child in node.any:
            yield from _leaf_valuesets(child)
        return
    spec = next(iter(node.__dict__.values()))
    for name, value in spec.__dict__.items():
        if name in ("in_", "code", "answer", "conditions", "observation", "feeding_answers", "weaned_answers",
                    "no_known", "critical_manifestations") and isinstance(value, str):
            yield value
        elif name == "not_in":
            yield from value
        elif name == "recent" and value is not None and value.in_:
            yield value.in_


def _leaf_settings(node: Any) -> Iterable[str]:
    if isinstance(node, AnyNode):
        for child in node.any:
            yield from _leaf_settings(child)
        return
    spec = next(iter(node.__dict__.values()))
    if isinstance(spec, ObservationSpec):
        yield spec.max_age_setting
    if isinstance(spec, ConditionSpec) and spec.recent:
        yield spec.recent.days_setting


def _check_rule(rule: Rule, valuesets: dict[str, ValueSet], reasons: dict[str, OverrideReason],
                by_id: dict[str, Rule]) -> None:
    from .settings import Settings  # the settings a rule may name are the clinical policy fields

    where = f"rules/{rule.id}.yaml"
    for name in _leaf_valuesets(rule.when):
        if name not in valuesets:
            raise KnowledgeError(f"{where}: unknown value set {name!r}")
    for name in _leaf_settings(rule.when):
        if name not in Settings.model_fields:
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
