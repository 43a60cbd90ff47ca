"""The schema of the files in cards/: strict pydantic models, so a typo or an unknown field stops the start-up.

A rule's `when` is a closed grammar: each node is a one-key mapping whose key names its kind.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Indicator = Literal["info", "warning", "critical"]
INDICATOR_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
SUMMARY_LIMIT = 140  # CDS Hooks: summary "<140 characters"


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
    abbreviations: list[str] = []  # case-sensitive shorthand (MI, CAD, T1DM), matched as whole tokens
    exclude_codes: list[CodeEntry] = []
    exclude_prefixes: list[PrefixEntry] = []
    exclude_text: list[str] = []
    about_relatives: bool = False  # records in this set are about family members: they match no other set


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
    exclude_text: list[str] = []  # an order that names only these (a leaflet, a consultation) is not the procedure
    procedure_text: list[str] = []  # ... unless it also names a session, a package, an injection, a product
    default_formulation: list[str]


class IngredientClass(Strict):
    id: str
    display: str
    synonyms: list[str] = []


class Ingredient(Strict):
    id: str
    display: str
    ingredient_class: str | None = Field(default=None, alias="class")
    members: list[str] = []  # a group standing for unspecified contents ("vitamins"): the ingredients it may hold
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
    sources: list[str] = []  # the articles, named as a reader would look them up; cards cite those a rule cites
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
    """The latest Observation of `code` (and `with_codes`, one series), not older than the setting, that says so:
    by its coded or text answer, a boolean, a result at or above a threshold, a due date not passed, or a
    gestational age that puts the pregnancy still ahead of 42 weeks."""

    code: str
    with_codes: list[str] = []  # more value sets of codes in the same series (pregnancy status and hCG tests)
    answer: str | None = None
    boolean: bool | None = None
    quantity_above: float | None = None
    quantity_units: list[str] = []  # the units `quantity_above` is in (a result in another unit is not read)
    due_date: bool = False
    gestational_age: bool = False
    ignore_answers: str | None = None  # answers that are no status ("unknown"): skipped, the one before counts
    superseded_by_delivery: bool = False  # a delivery recorded after the Observation ends what it says
    max_age_setting: str
    indicator: Indicator | None = None

    @model_validator(mode="after")
    def _reads_something(self) -> ObservationSpec:
        if (self.answer is None and self.boolean is None and self.quantity_above is None and not self.due_date
                and not self.gestational_age):
            raise ValueError("an observation node needs answer, boolean, quantity_above, due_date or gestational_age")
        return self


class MedicationSpec(Strict):
    in_: str = Field(alias="in")
    indicator: Indicator | None = None


class AllergySpec(Strict):
    no_known: str
    critical_manifestations: str
    severe_indicator: Indicator = "critical"
    non_immune: str | None = None  # an intolerance whose every recorded reaction is in this set is not an allergy
    environmental: str | None = None  # allergens that alone do not fire the rule (listed when it fires otherwise)


class IngredientAllergySpec(Strict):
    no_known: str
    related_indicator: Indicator = "warning"


class WeanedSpec(Strict):
    conditions: str
    observation: str
    feeding_answers: str
    weaned_answers: str


class PregnancyUnknownSpec(Strict):
    """Nothing rules out a capacity for pregnancy (not recorded as male, or male with a female birth sex or sex
    for clinical use), the age is in range (or not recorded), and no pregnancy record or status is recent."""

    conditions: str
    observation: str
    with_codes: list[str] = []
    ignore_answers: str | None = None


class PostpartumSpec(Strict):
    """A delivery (a postpartum record, the end of a pregnancy, a due date passed) within the setting's months,
    with no breastfeeding record dated after it."""

    deliveries: str
    pregnancies: str
    due_dates: str
    feeding: list[str]
    months_setting: str


class IncompleteSpec(Strict):
    pass


ANY = "*"  # a record kind read whatever its codes (every allergy; any data not obtained)


class LeafUse(NamedTuple):
    """What a grammar leaf reads of the record and which knowledge it names, declared once per leaf kind.

    `reads`: (record kind, value set name or ANY) pairs, any one of which must be in the record for the leaf to
    find anything (the rules skip a rule none of whose reads is present); None for a leaf that can fire on an
    empty record (it fires on an absence). `valuesets`: every value set the leaf names (checked at load).
    `policy`: the clinical policy parameters it names (checked at load against ClinicalPolicy).
    """

    reads: frozenset[tuple[str, str]] | None
    valuesets: tuple[str, ...]
    policy: tuple[str, ...] = ()


class Leaf(Strict):
    """A leaf of the condition grammar. Each kind overrides `uses`; one that does not is refused at start-up."""

    def uses(self) -> LeafUse:
        raise NotImplementedError(f"the grammar leaf {type(self).__name__} does not declare what it uses")


def _named(*names: str | None) -> tuple[str, ...]:
    return tuple(n for n in names if n)


class ConditionLeaf(Leaf):
    condition: ConditionSpec

    def uses(self) -> LeafUse:
        c, recent = self.condition, self.condition.recent
        return LeafUse(frozenset({("conditions", c.in_)}), _named(c.in_, *c.not_in, recent.in_ if recent else None),
                       _named(recent.days_setting if recent else None))


class ObservationLeaf(Leaf):
    observation: ObservationSpec

    def uses(self) -> LeafUse:
        o = self.observation
        return LeafUse(frozenset({("observations", c) for c in (o.code, *o.with_codes)}),
                       _named(o.code, *o.with_codes, o.answer, o.ignore_answers), (o.max_age_setting,))


class MedicationLeaf(Leaf):
    medication: MedicationSpec

    def uses(self) -> LeafUse:
        return LeafUse(frozenset({("medications", self.medication.in_)}), (self.medication.in_,))


class AllergyLeaf(Leaf):
    allergy: AllergySpec

    def uses(self) -> LeafUse:
        a = self.allergy
        return LeafUse(frozenset({("allergies", ANY)}),
                       _named(a.no_known, a.critical_manifestations, a.non_immune, a.environmental))


class IngredientAllergyLeaf(Leaf):
    ingredient_allergy: IngredientAllergySpec

    def uses(self) -> LeafUse:
        return LeafUse(frozenset({("allergies", ANY)}), (self.ingredient_allergy.no_known,))


class WeanedLeaf(Leaf):
    weaned: WeanedSpec

    def uses(self) -> LeafUse:
        w = self.weaned
        return LeafUse(frozenset({("conditions", w.conditions), ("observations", w.observation)}),
                       (w.conditions, w.observation, w.feeding_answers, w.weaned_answers), ("weaning_wait_months",))


class PregnancyUnknownLeaf(Leaf):
    pregnancy_status_unknown: PregnancyUnknownSpec

    def uses(self) -> LeafUse:
        p = self.pregnancy_status_unknown
        return LeafUse(None, _named(p.conditions, p.observation, *p.with_codes, p.ignore_answers),
                       ("childbearing_age_min", "childbearing_age_max", "pregnancy_status_max_age_days"))


class IncompleteLeaf(Leaf):
    screening_incomplete: IncompleteSpec

    def uses(self) -> LeafUse:
        return LeafUse(frozenset({("unavailable", ANY)}), ())


class PostpartumLeaf(Leaf):
    postpartum: PostpartumSpec

    def uses(self) -> LeafUse:
        p = self.postpartum
        return LeafUse(frozenset({("conditions", p.deliveries), ("conditions", p.pregnancies),
                                  ("observations", p.due_dates)}),
                       (p.deliveries, p.pregnancies, p.due_dates, *p.feeding), (p.months_setting,))


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
    | Annotated[IncompleteLeaf, Tag("screening_incomplete")]
    | Annotated[PostpartumLeaf, Tag("postpartum")],
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
    status: Literal["active", "silent", "draft", "retired"]  # silent: computed, recorded, not shown
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
