"""The vocabulary coverage audit: no code that real systems send reaches the rules unreviewed.

Every entry of the committed vocabularies (fixtures/vocabularies/: the synthetic population's codes, the ICD-10-CM
and WHO ICD-10 chapters that bear on a rule, the published VSAC members) is classified by its code alone, through
the service's own loader and index, and must be either in some value set (or an ingredient the service knows) or
on the reviewed "not a contraindication" list in cards/reviewed/. Nothing may be both. A value set's text patterns
never count here: an EHR may send any of these codes without a display.

    .venv/bin/python tests/knowledge/test_coverage.py      # prints the audit's figures (cards/README.md quotes them)
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from cds.fhir.json import ICD10CM, Coded, Coding, norm_system
from cds.knowledge.index import icd_key, system_uri
from cds.knowledge.loader import KnowledgeBase, load_knowledge

ROOT = Path(__file__).resolve().parents[2]
CARDS = ROOT / "cards"
VOCAB = ROOT / "fixtures" / "vocabularies"
SHOWN = 15  # unreviewed entries printed on failure


@dataclass(frozen=True, slots=True)
class Entry:
    vocabulary: str
    system: str
    code: str
    display: str

    def __str__(self) -> str:
        return f"{self.vocabulary}: {self.system} {self.code} {self.display}"


def _tsv(path: Path) -> list[dict[str, str]]:
    raw = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    return list(csv.DictReader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE))


@cache
def vocabularies() -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    seen: set[tuple[str, str]] = set()
    population = []
    for row in _tsv(VOCAB / "population-codes.tsv"):
        system = norm_system(row["system"])
        if (system, row["code"]) not in seen:
            seen.add((system, row["code"]))
            population.append(Entry("population", system, row["code"], row["display"]))
    out["population"] = population
    out["ICD-10-CM"] = [Entry("ICD-10-CM", ICD10CM, r["code"], r["display"]) for r in _tsv(VOCAB / "icd10cm.tsv.gz")]
    out["WHO ICD-10"] = [Entry("WHO ICD-10", ICD10CM, r["code"], r["display"]) for r in _tsv(VOCAB / "icd10who.tsv")]
    out["VSAC"] = [Entry("VSAC", system_uri(r["system"]), r["code"], r["display"]) for r in _tsv(VOCAB / "vsac.tsv")]
    return out


@dataclass
class Reviewed:
    codes: dict[tuple[str, str], str]  # (system, code) -> reason
    prefixes: dict[str, dict[str, str]]  # system -> {prefix: reason}
    lengths: dict[str, list[int]]  # system -> prefix lengths

    def reason(self, system: str, code: str) -> str | None:
        key = icd_key(code) if system == ICD10CM else code
        found = self.codes.get((system, key))
        if found is not None:
            return found
        table = self.prefixes.get(system)
        if table:
            for length in self.lengths[system]:
                if (why := table.get(key[:length])) is not None and len(key) >= length:
                    return why
        return None



@cache
def reviewed() -> Reviewed:
    codes: dict[tuple[str, str], str] = {}
    prefixes: dict[str, dict[str, str]] = {}
    for path in sorted((CARDS / "reviewed").glob("*.yaml")):
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert set(spec) == {"groups"}, f"{path.name}: only `groups:` is allowed"
        for group in spec["groups"]:
            assert set(group) <= {"reason", "system", "entries"}, f"{path.name}: unknown key in {group}"
            reason = group["reason"]
            assert isinstance(reason, str) and reason.strip() and "\n" not in reason, f"{path.name}: one-line reason"
            for item in group["entries"]:
                assert set(item) <= {"system", "code", "prefix", "display"}, f"{path.name}: unknown key in {item}"
                system = system_uri(item.get("system") or group.get("system") or "")
                assert system, f"{path.name}: {item} has no system"
                if "code" in item:
                    key = icd_key(str(item["code"])) if system == ICD10CM else str(item["code"])
                    codes[(system, key)] = reason
                else:
                    prefix = icd_key(str(item["prefix"])) if system == ICD10CM else str(item["prefix"])
                    prefixes.setdefault(system, {})[prefix] = reason
    return Reviewed(codes, prefixes, {s: sorted({len(p) for p in t}) for s, t in prefixes.items()})


@cache
def knowledge() -> KnowledgeBase:
    return load_knowledge(CARDS)


def in_value_sets(kb: KnowledgeBase, e: Entry) -> set[str]:
    """The value sets (and ingredient) `e` is in by its code alone: one Coding, no display, no text."""
    found = set(kb.index.hits(Coded((Coding(e.system, e.code, ""),), ())))
    if (e.system, e.code) in kb.ingredient_codes:
        found.add("ingredient:" + kb.ingredient_codes[(e.system, e.code)])
    return found


def audit() -> tuple[dict[str, Counter[str]], list[Entry], list[tuple[Entry, set[str], str]]]:
    kb, rev = knowledge(), reviewed()
    figures: dict[str, Counter[str]] = {}
    unreviewed: list[Entry] = []
    contradictions: list[tuple[Entry, set[str], str]] = []
    for name, entries in vocabularies().items():
        counts = figures[name] = Counter()
        for e in entries:
            sets = in_value_sets(kb, e)
            why = rev.reason(e.system, e.code)
            counts["entries"] += 1
            if sets and why:
                contradictions.append((e, sets, why))
            elif sets:
                counts["in value sets"] += 1
            elif why:
                counts["reviewed not relevant"] += 1
            else:
                unreviewed.append(e)
    return figures, unreviewed, contradictions


def test_vocabularies_are_big_enough_to_mean_something() -> None:
    vocab = vocabularies()
    assert len(vocab["population"]) > 1000
    assert len(vocab["ICD-10-CM"]) > 50_000 and len(vocab["WHO ICD-10"]) > 4000 and len(vocab["VSAC"]) > 5000
    runs = sorted((VOCAB / "population").glob("*.jsonl.gz"))
    patients = sum(gzip.decompress(p.read_bytes()).count(b"\n") for p in runs)
    assert patients >= 1000, f"the population has {patients} patients"


def test_every_vocabulary_entry_is_in_a_value_set_or_reviewed() -> None:
    _, unreviewed, contradictions = audit()
    assert not unreviewed, (f"{len(unreviewed)} vocabulary entries are neither in a value set nor on the reviewed "
                            "list (cards/reviewed/); the first ones:\n" +
                            "\n".join(str(e) for e in unreviewed[:SHOWN]))
    assert not contradictions, (f"{len(contradictions)} entries are both in a value set and reviewed as not relevant:"
                                "\n" + "\n".join(f"{e} -> {sorted(s)} / reviewed: {why}"
                                                 for e, s, why in contradictions[:SHOWN]))


def test_reviewed_entries_name_known_systems_and_no_value_set_code() -> None:
    """The reverse check over the reviewed list itself: an exact reviewed code is in no value set."""
    kb, rev = knowledge(), reviewed()
    clashes = [(system, code, sorted(sets)) for (system, code), _ in rev.codes.items()
               if (sets := in_value_sets(kb, Entry("reviewed", system, code, "")))]
    assert not clashes, f"reviewed as not relevant but in a value set: {clashes[:SHOWN]}"
    known = {system_uri(s) for s in ("snomed", "loinc", "icd10cm", "rxnorm", "atc")}
    systems = {s for s, _ in rev.codes} | set(rev.prefixes)
    assert systems <= known, f"unknown systems in cards/reviewed/: {systems - known}"


def test_the_audit_fails_on_an_unreviewed_code() -> None:
    """The audit can fail: a made-up code that no value set or review covers is reported."""
    kb, rev = knowledge(), reviewed()
    fake = Entry("population", system_uri("snomed"), "999999999999", "Made-up finding")
    assert not in_value_sets(kb, fake) and rev.reason(fake.system, fake.code) is None
    mi = Entry("population", system_uri("snomed"), "401303003", "")
    assert "myocardial-infarction" in in_value_sets(kb, mi)


if __name__ == "__main__":
    figures, unreviewed, contradictions = audit()
    for name, counts in figures.items():
        sys.stdout.write(f"| {name} | {counts['entries']:,} | {counts['in value sets']:,} | "
                         f"{counts['reviewed not relevant']:,} |\n")
    sys.stdout.write(f"unreviewed {len(unreviewed)}, contradictions {len(contradictions)}\n")
    for e in unreviewed[:200]:
        sys.stdout.write(f"   {e}\n")
