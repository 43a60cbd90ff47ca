"""cards/ is validated strictly at start-up: a broken knowledge base stops the service with a reason."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cds.errors import ConfigError, KnowledgeError
from cds.knowledge.loader import SUMMARY_LIMIT, load_knowledge

from conftest import ROOT

CARDS = ROOT / "cards"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present: the value sets hold thousands of codes
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
TOPICS = {"pregnancy", "breastfeeding", "recently-weaned", "pregnancy-status-unknown", "allergy-history",
          "ingredient-allergy", "insulin-dependent-diabetes", "cardiovascular-disease", "myocardial-infarction",
          "cancer-history", "bleeding-risk", "treatment-area-lesion", "immunosuppression", "screening-incomplete",
          "postpartum-feeding-unknown"}


def test_shipped_knowledge_loads_with_every_topic() -> None:
    kb = load_knowledge(CARDS)
    assert {r.id for r in kb.rules} == TOPICS
    for rule in kb.rules:
        assert rule.version >= 1 and rule.source.citation and rule.source.quote
        assert all(len(s) < SUMMARY_LIMIT for s in rule.summary.values())
    assert kb.by_id["immunosuppression"].extension  # marked as going beyond the seed articles


def test_rules_cite_seed_articles_that_exist() -> None:
    seeds = ROOT.parent / "shared" / "seeds"
    for path in (CARDS / "rules").glob("*.yaml"):
        seed = yaml.safe_load(path.read_text())["source"]["seed"].split()[0]
        assert seed.endswith(".txt")
        if seeds.is_dir():
            assert (seeds / seed).is_file(), f"{path.name} cites missing seed {seed}"


def test_no_unverified_code_ships() -> None:
    for path in (CARDS / "valuesets").glob("*.yaml"):
        data = yaml.load(path.read_text(), Loader=LOADER)  # PyYAML itself, not the loader's reader
        for entry in data.get("codes", []) + data.get("prefixes", []):
            assert entry["verified"] in ("V", "V2", "derived", "local"), (path.name, entry)


def edit(path: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        file = root / path
        data = yaml.load(file.read_text(), Loader=LOADER)
        change(data)
        file.write_text(yaml.dump(data, Dumper=DUMPER, allow_unicode=True))
    return apply


def replace(path: str, old: str, new: str) -> Callable[[Path], None]:
    """Edit a file's text, its first `old` only (comments and layout kept)."""
    def apply(root: Path) -> None:
        file = root / path
        text = file.read_text()
        assert old in text
        file.write_text(text.replace(old, new, 1))
    return apply


BROKEN = {
    "unknown-field": (edit("rules/pregnancy.yaml", lambda d: d.update(colour="red")), "colour"),
    "dangling-value-set": (edit("rules/cancer-history.yaml", lambda d: d["when"]["condition"].update(
        **{"in": "no-such-set"})), "unknown value set 'no-such-set'"),
    "duplicate-id": (lambda root: (root / "rules/pregnancy.yaml").write_text(
        (root / "rules/pregnancy.yaml").read_text().replace("id: pregnancy\n", "id: breastfeeding\n")),
        "must equal the file name"),
    "long-summary": (edit("rules/pregnancy.yaml", lambda d: d["summary"].update(critical="x" * 140)),
                     "CDS Hooks needs < 140"),
    "unverified-code": (edit("valuesets/cancer.yaml", lambda d: d["codes"][0].update(verified="U")), "verified"),
    # the same inside a generated block, markers kept (read line by line unless a line has another shape)
    "unverified-generated-code": (replace("valuesets/cancer.yaml", "verified: V, source", "verified: U, source"),
                                  "verified"),
    "unknown-field-in-generated-code": (replace("valuesets/cancer.yaml", "verified: V, source",
                                                "verified: V, colour: red, source"), "colour"),
    "unknown-override-reason": (edit("rules/pregnancy.yaml", lambda d: d["override_reasons"].append("because")),
                                "unknown override reason 'because'"),
    "unknown-node": (edit("rules/pregnancy.yaml", lambda d: d.update(when={"laboratory": {}})), "laboratory"),
    "invalid-suggested-resource": (edit("rules/pregnancy.yaml", lambda d: d["suggestions"][0]["create"][
        "resource"].pop("intent")), "not valid R4"),
    "bad-regex": (edit("valuesets/cancer.yaml", lambda d: d["text"].append("(unclosed")), "bad text pattern"),
    "unknown-ingredient": (edit("orderables.yaml", lambda d: d["default_formulation"].append("unobtainium")),
                           "unobtainium"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_invalid_knowledge_is_refused_with_a_reason(name: str, tmp_path: Path) -> None:
    root = tmp_path / "cards"
    shutil.copytree(CARDS, root)
    change, message = BROKEN[name]
    change(root)
    with pytest.raises(KnowledgeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_knowledge(root)


def test_duplicate_ids_across_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "cards"
    shutil.copytree(CARDS, root)
    shutil.copy(root / "rules/pregnancy.yaml", root / "rules/pregnancy-copy.yaml")
    with pytest.raises(KnowledgeError):
        load_knowledge(root)


def test_silent_and_active_overrides() -> None:
    kb = load_knowledge(CARDS)
    assert kb.with_overrides(silent=["bleeding-risk"]) is kb  # applied at start-up, on the loaded knowledge
    assert kb.silent == {"bleeding-risk"} and kb.status(kb.by_id["bleeding-risk"]) == "silent"
    shown = kb.without(kb.silent)
    assert "bleeding-risk" not in shown.by_id and "bleeding-risk" not in {r.id for r in shown.rules}
    assert shown.silent == frozenset() and len(shown.rules) == len(kb.rules) - 1
    with pytest.raises(ConfigError, match="unknown rule"):
        kb.with_overrides(silent=["no-such-rule"])
    with pytest.raises(ConfigError, match="both silent and active"):
        kb.with_overrides(silent=["pregnancy"], active=["pregnancy"])
