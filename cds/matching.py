"""Compiled matchers: value sets as code sets and ICD-10-CM prefix tables, negation-aware text search, body sites.

Built once at start-up from cards/ (see `knowledge.load_knowledge`); matching a record is set look-ups and a few
precompiled regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .fhirjson import ICD10CM, LOINC, RXNORM, SNOMED, Coded, fold, norm_system
from .schema import BodySite, PrefixEntry

SYSTEM_ALIASES = {
    "snomed": SNOMED,
    "loinc": LOINC,
    "icd10cm": ICD10CM,
    "rxnorm": RXNORM,
    "atc": "http://www.whocc.no/atc",
}


def system_uri(name: str) -> str:
    return norm_system(SYSTEM_ALIASES.get(name, name))


def icd_key(code: str) -> str:
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


def union_pattern(patterns: Iterable[str]) -> re.Pattern[str] | None:
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
            key = icd_key(code) if system == ICD10CM else code
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
            key = (c.system, icd_key(c.code) if c.system == ICD10CM else c.code)
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
                key = icd_key(c.code)
                for prefix, site in self.icd_prefixes:
                    if key.startswith(prefix):
                        found.add(site)
                        break
        if not found:
            for text in value.all_texts():
                folded = fold(text)
                found.update(site for site, pattern in self.text if pattern.search(folded))
        return found


def phrases(words: Iterable[str]) -> list[str]:
    return [r"\b" + re.escape(fold(w)) for w in words]


def prefix_table(entries: Iterable[PrefixEntry]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for p in entries:
        system = system_uri(p.system)
        table.setdefault(system, []).append(icd_key(p.prefix) if system == ICD10CM else p.prefix)
    return {k: tuple(v) for k, v in table.items()}
