"""Compiled matchers: value sets as code sets and ICD-10-CM prefix tables, negation-aware text search, body sites.

Built once at start-up from cards/ (see `loader.load_knowledge`); matching a record is set look-ups and a few
precompiled regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..fhir.json import (
    ICD10CM,
    LOINC,
    MEMO_CHARS,
    RXNORM,
    SNOMED,
    Coded,
    concept_chars,
    fold,
    norm_system,
    strip_accents,
    text_limit,
)
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


_NOT_ICD_CHARS = re.compile(r"[^0-9A-Z]")


def icd_key(code: str) -> str:
    """An ICD-10 code as its letters and digits: "E10.9", "e109", "E10.9-", "I25.21†" and "C50.9!" read alike."""
    return _NOT_ICD_CHARS.sub("", code.upper())


@dataclass(frozen=True, slots=True)
class Match:
    by: Literal["code", "text"]
    what: str  # "SNOMED 77386006 Pregnant" or the matched text


MEMO_LIMIT = 50_000  # distinct texts remembered per matcher; EHR displays repeat, so most look-ups hit


@dataclass(slots=True)
class TextMatcher:
    """Accent-insensitive phrase search that ignores negated mentions.

    `pattern` runs over lower-cased text; `abbreviations` (problem-list shorthand: MI, CAD, T1DM, "Ca breast")
    run over the text with its case kept, so that "MI" never fires on "mi" or "Mind". Decisions are memoised
    per text: the same display ("Hypertensive disorder") recurs across every chart, and the answer depends only
    on the text and the knowledge loaded at start-up.
    """

    pattern: re.Pattern[str] | None
    negation_before: re.Pattern[str]
    negation_after: re.Pattern[str]
    exclude: re.Pattern[str] | None = None
    abbreviations: re.Pattern[str] | None = None
    memo: dict[str, bool] = field(default_factory=dict)
    memo_chars: int = 0

    def search(self, text: str) -> str | None:
        """`text` when it mentions the pattern outside a negation (and no exclusion applies), else None.

        A text over `fhir.json.text_limit()` characters is matched on its first part only, and never memoised."""
        if self.pattern is None and self.abbreviations is None:
            return None
        limit = text_limit()
        if len(text) > limit:
            return text if self._decide(text[:limit]) else None
        hit = self.memo.get(text)
        if hit is None:
            if len(self.memo) >= MEMO_LIMIT or self.memo_chars + len(text) > MEMO_CHARS:
                self.memo.clear()
                self.memo_chars = 0
            hit = self.memo[text] = self._decide(text)
            self.memo_chars += len(text)
        return text if hit else None

    def _decide(self, text: str) -> bool:
        folded = fold(text)
        if self.exclude is not None and self.exclude.search(folded):
            return False
        if self.pattern is not None and self._affirmed(self.pattern, folded):
            return True
        return self.abbreviations is not None and self._affirmed(self.abbreviations, strip_accents(text))

    def _affirmed(self, pattern: re.Pattern[str], text: str) -> bool:
        """Whether some match of `pattern` in `text` is not negated within its clause."""
        for m in pattern.finditer(text):
            clause_start = max(text.rfind(sep, 0, m.start()) for sep in (".", ";", ",", "|")) + 1
            before = text[clause_start : m.start()].lower()
            word_end = m.end()
            while word_end < len(text) and text[word_end].isalnum():  # "pregnan|t: no" -> after is ": no"
                word_end += 1
            after_end = min([i for i in (text.find(s, word_end) for s in ".;,|") if i >= 0] or [len(text)])
            after = text[word_end:after_end].lower()
            if self.negation_before.search(before) or self.negation_after.search(after):
                continue
            return True
        return False


def abbreviation_pattern(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """Case-sensitive shorthand, each alternative bounded by non-alphanumerics ("AF" is not in "AFTER")."""
    items = list(patterns)
    if not items:
        return None
    return re.compile("|".join(f"(?<![A-Za-z0-9])(?:{p})(?![A-Za-z0-9])" for p in items))


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
    text: TextMatcher  # carries the value set's exclude_text
    about_relatives: bool = False
    index: MatchIndex | None = None

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
        assert self.index is not None, "value set used before its knowledge base was built"
        return self.index.hits(value).get(self.id)

    def match_slow(self, value: Coded) -> Match | None:
        """The same answer as `match`, computed for this value set alone (the index is built from this)."""
        for c in value.codings:
            if c.code and self._code_hit(c.system, c.code, self.excluded, self.excluded_prefixes):
                return None
        for c in value.codings:
            if not c.code:
                continue
            key = (c.system, icd_key(c.code) if c.system == ICD10CM else c.code)
            if key in self.codes or self._code_hit(c.system, c.code, (), self.prefixes):
                return Match("code", code_label(c))
        for text in value.all_texts():
            if self.text.search(text):
                return Match("text", text)
        return None


def code_label(c: Any) -> str:
    return f"{_system_label(c.system)} {c.code} {c.display}".strip()


class MatchIndex:
    """Every value set at once: (system, code) and prefix look-ups, and a memo of text decisions.

    `hits(value)` says which value sets a concept belongs to, with the same precedence as `ValueSet.match_slow`
    (an excluded code rules the set out; a code match beats a text match), and caches the answer on the value.
    """

    def __init__(self, valuesets: dict[str, ValueSet]) -> None:
        self._sets = list(valuesets.values())
        self._codes: dict[tuple[str, str], list[str]] = {}
        self._excluded: dict[tuple[str, str], list[str]] = {}
        self._prefixes: dict[tuple[str, str], list[str]] = {}
        self._excluded_prefixes: dict[tuple[str, str], list[str]] = {}
        self._lengths: dict[str, set[int]] = {}
        self._about_relatives = {vs.id for vs in self._sets if vs.about_relatives}
        for vs in self._sets:
            vs.index = self
            for key in vs.codes:
                self._codes.setdefault(key, []).append(vs.id)
            for key in vs.excluded:
                k = (key[0], icd_key(key[1]) if key[0] == ICD10CM else key[1])
                self._excluded.setdefault(k, []).append(vs.id)
            for table, target in ((vs.prefixes, self._prefixes), (vs.excluded_prefixes, self._excluded_prefixes)):
                for system, prefixes in table.items():
                    for prefix in prefixes:
                        target.setdefault((system, prefix), []).append(vs.id)
                        self._lengths.setdefault(system, set()).add(len(prefix))
        self._text_memo: dict[str, tuple[str, ...]] = {}
        self._memo: dict[tuple[Any, ...], dict[str, Match]] = {}
        self._text_memo_chars = 0
        self._memo_chars = 0

    def _text_sets(self, text: str) -> tuple[str, ...]:
        if len(text) > text_limit():  # long: matched on its first part (TextMatcher.search), never memoised
            return tuple(vs.id for vs in self._sets if vs.text.search(text))
        found = self._text_memo.get(text)
        if found is None:
            if len(self._text_memo) >= MEMO_LIMIT or self._text_memo_chars + len(text) > MEMO_CHARS:
                self._text_memo.clear()
                self._text_memo_chars = 0
            found = self._text_memo[text] = tuple(vs.id for vs in self._sets if vs.text.search(text))
            self._text_memo_chars += len(text)
        return found

    def hits(self, value: Coded) -> dict[str, Match]:
        cached = value.hits
        if cached is not None and cached[0] is self:  # concepts are shared across requests (fhirjson.coded)
            return cached[1]
        key = (value.codings, value.texts)  # the same concept recurs across charts: classify it once
        found = self._memo.get(key)
        if found is None:
            found = self._classify(value)
            chars = concept_chars(value)
            if chars <= text_limit():  # a concept with a long text is classified afresh, never memoised
                if len(self._memo) >= MEMO_LIMIT or self._memo_chars + chars > MEMO_CHARS:
                    self._memo.clear()
                    self._memo_chars = 0
                self._memo[key] = found
                self._memo_chars += chars
        value.hits = (self, found)
        return found

    def _classify(self, value: Coded) -> dict[str, Match]:
        hits: dict[str, Match] = {}
        excluded: set[str] = set()
        for c in value.codings:
            if not c.code:
                continue
            code = icd_key(c.code) if c.system == ICD10CM else c.code
            for vs_id in self._excluded.get((c.system, code), ()):
                excluded.add(vs_id)
            found = list(self._codes.get((c.system, code), ()))
            for length in self._lengths.get(c.system, ()):
                if len(code) >= length:
                    found.extend(self._prefixes.get((c.system, code[:length]), ()))
                    excluded.update(self._excluded_prefixes.get((c.system, code[:length]), ()))
            for vs_id in found:
                if vs_id not in hits:
                    hits[vs_id] = Match("code", code_label(c))
        for text in value.all_texts():
            for vs_id in self._text_sets(text):
                if vs_id not in hits:
                    hits[vs_id] = Match("text", text)
        for vs_id in excluded:
            hits.pop(vs_id, None)
        relatives = self._about_relatives.intersection(hits)
        if relatives:  # "Family history of ...": about a relative, so it matches nothing about the patient
            hits = {vs_id: hits[vs_id] for vs_id in relatives}
        return hits


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
        """Treatment-area sites named by codes or words in `value` (empty: none recognised), the most specific
        ones: "lower leg" names the lower leg, not also the whole leg."""
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
                folded = fold(text[:text_limit()])
                found.update(site for site, pattern in self.text if pattern.search(folded))
        if len(found) > 1:
            ancestors = {a for site in found for a in self.lineage(site) if a != site}
            found -= ancestors
        return found


def phrases(words: Iterable[str]) -> list[str]:
    """Names as the start of a word ("abdomin" finds abdominal, "hyaluronic" hyaluronate), except where the name
    ends in a short word, which must end there too ("lip" is not in "lipoma", "vitamin b1" not in "vitamin b12",
    "vitamin a" not in "vitamin and")."""
    out = []
    for w in words:
        folded = fold(w)
        last = folded.rsplit(" ", 1)[-1]
        out.append(rf"\b{re.escape(folded)}\b" if len(last) <= 4 else rf"\b{re.escape(folded)}")
    return out


def prefix_table(entries: Iterable[PrefixEntry]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for p in entries:
        system = system_uri(p.system)
        table.setdefault(system, []).append(icd_key(p.prefix) if system == ICD10CM else p.prefix)
    return {k: tuple(v) for k, v in table.items()}
