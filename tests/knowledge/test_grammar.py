"""The condition grammar of cards/rules: every leaf kind declares once what it reads and which value sets and
policy parameters it names (knowledge/schema.py, `Leaf.uses`), and the rules evaluate it (screening/rules.py).
A leaf kind that does either without the other stops the start-up; it is never skipped in silence."""

from __future__ import annotations

import typing

import pytest

from cds.errors import KnowledgeError
from cds.knowledge import schema
from cds.knowledge.loader import leaf_use, leaves, load_knowledge
from cds.knowledge.policy import ClinicalPolicy
from cds.screening import rules
from cds.screening.pipeline import Screening
from cds.settings import Settings

from conftest import ROOT


def leaf_kinds() -> list[type]:
    """The leaf kinds of the grammar's `Node` union (every node kind but `any`)."""
    union = typing.get_args(schema.Node)[0]
    kinds = [typing.get_args(member)[0] for member in typing.get_args(union)]
    return [kind for kind in kinds if kind is not schema.AnyNode]


def test_every_leaf_kind_declares_what_it_uses_and_is_evaluated() -> None:
    kinds = leaf_kinds()
    assert len(kinds) >= 9
    for kind in kinds:
        assert issubclass(kind, schema.Leaf), kind.__name__
        assert "uses" in vars(kind), f"{kind.__name__} does not declare what it reads (Leaf.uses)"
        assert kind in rules.EVALUATED, f"{kind.__name__} is not evaluated by screening/rules.py"
    assert set(rules.EVALUATED) == set(kinds)


def test_what_the_shipped_leaves_name_exists() -> None:
    kb = load_knowledge(ROOT / "cards")
    seen = set()
    for rule in kb.rules:
        for leaf in leaves(rule.when):
            use = leaf_use(leaf)
            seen.add(type(leaf))
            assert all(kb.vs(name) is not None for name in use.valuesets)
            assert set(use.policy) <= ClinicalPolicy.NAMES
            assert use.reads is None or all(name == schema.ANY or name in use.valuesets for _, name in use.reads)
    assert seen == set(leaf_kinds())  # the shipped rules use every kind, so the checks above cover each one


class Undescribed(schema.Leaf):
    """A leaf kind added to the grammar without saying what it reads."""

    undescribed: dict[str, str]


def test_an_undescribed_leaf_is_a_knowledge_error() -> None:
    with pytest.raises(KnowledgeError, match="Undescribed does not declare what it uses"):
        leaf_use(Undescribed(undescribed={}), "rules/example.yaml")


def test_a_rule_with_an_undescribed_or_unevaluated_leaf_stops_the_start_up() -> None:
    settings = Settings(env="dev")
    policy = ClinicalPolicy.from_settings(settings)
    kb = load_knowledge(ROOT / "cards")
    Screening(kb, policy, settings)  # the shipped rules are described and evaluated
    kb = load_knowledge(ROOT / "cards")
    kb.rules[0] = kb.rules[0].model_copy(update={"when": schema.AnyNode.model_construct(
        any=[kb.rules[0].when, Undescribed(undescribed={})])})
    with pytest.raises(KnowledgeError, match=f"rules/{kb.rules[0].id}.yaml: .*Undescribed"):
        Screening(kb, policy, settings)

    class Unevaluated(schema.Leaf):
        unevaluated: dict[str, str]

        def uses(self) -> schema.LeafUse:
            return schema.LeafUse(None, ())

    kb = load_knowledge(ROOT / "cards")
    kb.rules[-1] = kb.rules[-1].model_copy(update={"when": Unevaluated(unevaluated={})})
    with pytest.raises(KnowledgeError, match="Unevaluated is not evaluated"):
        Screening(kb, policy, settings)


def test_a_rule_naming_an_unknown_policy_parameter_is_refused(tmp_path: typing.Any) -> None:
    import shutil

    import yaml

    shutil.copytree(ROOT / "cards", tmp_path / "cards")
    path = tmp_path / "cards" / "rules" / "postpartum-feeding-unknown.yaml"
    data = yaml.safe_load(path.read_text())
    data["when"]["postpartum"]["months_setting"] = "fhir_timeout_s"  # a setting, not a clinical policy parameter
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(KnowledgeError, match="unknown setting 'fhir_timeout_s'"):
        load_knowledge(tmp_path / "cards")
