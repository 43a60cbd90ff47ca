"""Tolerant readers for raw FHIR JSON: the few fields the rules need, from R4, R4B, R5 or older shapes.

Full model validation (fhir.resources) costs more per resource than the whole screening of a typical record
(bench/README.md, "Measurements behind the code"), so the hot path reads plain dicts here
and validates only the resources that end up as evidence (see `record.validate_evidence`).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any, NamedTuple

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# Alternative spellings of the same system seen in the wild (trailing slash, OIDs).
_SYSTEM_ALIASES = {
    "http://snomed.info/sct/": SNOMED,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "http://www.nlm.nih.gov/research/umls/rxnorm/": RXNORM,
}
# Every edition of ICD-10 (WHO, -CM, -GM, -AM, -CA, national ones) shares the WHO categories, so all of them are
# read as one system: value sets list ICD-10 prefixes once and they serve every edition. Editions are recognised
# by their FHIR URIs ("http://hl7.org/fhir/sid/icd-10", ".../icd-10-cm", "http://fhir.de/CodeSystem/bfarm/icd-10-gm",
# ".../icd-10-am", ".../icd-10-ca", ...) and OIDs. ICD-10-PCS is a procedure classification, never read as ICD-10.
_ICD10_URI = re.compile(r"icd-?10(?!-?pcs)", re.IGNORECASE)
_ICD10_OIDS = re.compile(
    r"^urn:oid:(2\.16\.840\.1\.113883\.6\.(3|3\.\d+|90|94|135)|1\.2\.276\.0\.76\.5\.\d+)$")
_NOT_ICD10 = ("http://www.cms.gov/Medicare/Coding/ICD10",)  # ICD-10-PCS's FHIR URI
_NORMALISED: dict[str, str] = {}


def norm_system(system: str | None) -> str:
    """The canonical URI of a code system: alias and OID forms, and every ICD-10 edition, read as one."""
    if not system:
        return ""
    found = _NORMALISED.get(system)
    if found is None:
        found = _SYSTEM_ALIASES.get(system, system)
        if found == system and system not in _NOT_ICD10 and (
                _ICD10_URI.search(system) or _ICD10_OIDS.match(system)):
            found = ICD10CM
        if len(_NORMALISED) < 4096:  # systems are few; a flood of made-up ones is normalised, not remembered
            _NORMALISED[system] = found
    return found


# Memory bounded by bytes (issue 15): a text longer than the limit is matched on its first part only and is
# never memoised, and every memo counts the characters of what it keeps and starts again past MEMO_CHARS.
_TEXT_LIMIT = [4096]  # characters; set from CDS_MAX_TEXT_CHARS at start-up (a list: set without `global`)
MEMO_CHARS = 4_000_000  # per memo, characters of its keys (a few MB), then it is emptied and starts again
_FOLD_MEMO_CHARS = 256  # only texts this short go through fold's cache (65,536 of them: at most 16 M characters)


def text_limit() -> int:
    return _TEXT_LIMIT[0]


def set_text_limit(chars: int) -> None:
    _TEXT_LIMIT[0] = max(64, chars)


# Letters that Unicode does not decompose into a base letter and a mark: Vietnamese đ, Polish ł, Nordic ø, ...
_LETTERS = str.maketrans({"đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "ß": "ss", "æ": "ae",
                          "Æ": "AE", "œ": "oe", "Œ": "OE", "ı": "i", "ħ": "h", "ŧ": "t"})  # noqa: RUF001 - Turkish dotless i


def strip_accents(text: str) -> str:
    """Accent-free, single-spaced text with its case kept ("Đái tháo đường" -> "Dai thao duong")."""
    return _strip_cached(text) if len(text) <= _FOLD_MEMO_CHARS else _strip(text)


@lru_cache(maxsize=65_536)
def _strip_cached(text: str) -> str:
    return _strip(text)


def _strip(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.translate(_LETTERS))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return re.sub(r"\s+", " ", stripped).strip()


def fold(text: str) -> str:
    """Lower-case, accent-free, single-spaced text for matching ("Mésothérapie" -> "mesotherapie")."""
    return _fold_cached(text) if len(text) <= _FOLD_MEMO_CHARS else _fold(text)


@lru_cache(maxsize=65_536)
def _fold_cached(text: str) -> str:
    return _fold(text)


def _fold(text: str) -> str:
    return _strip(text).casefold()




class Coding(NamedTuple):
    system: str
    code: str
    display: str


class Coded:
    """A CodeableConcept reduced to its codings and texts (R5 CodeableReference.concept unwrapped).

    `hits` caches which value sets this concept belongs to (filled by `knowledge.index.MatchIndex`, with the index that
    classified it), so a concept is classified once, however many rules and requests ask. Never mutated
    otherwise: `coded` hands out the same object for the same JSON.
    """

    __slots__ = ("codings", "texts", "hits")

    def __init__(self, codings: tuple[Coding, ...] = (), texts: tuple[str, ...] = ()) -> None:
        self.codings = codings
        self.texts = texts
        self.hits: tuple[Any, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"Coded({self.codings!r}, {self.texts!r})"

    @property
    def label(self) -> str:
        for text in self.texts:
            if text:
                return text
        for coding in self.codings:
            if coding.display:
                return coding.display
        for coding in self.codings:
            if coding.code:
                return coding.code
        return "(no code or text)"

    def all_texts(self) -> list[str]:
        return [t for t in self.texts if t] + [c.display for c in self.codings if c.display]

    def merged(self, other: Coded) -> Coded:
        if not other.codings and not other.texts:
            return self
        if not self.codings and not self.texts:
            return other
        return Coded(self.codings + other.codings, self.texts + other.texts)


EMPTY = Coded()


_CONCEPTS: dict[tuple[Any, ...], Coded] = {}  # a CodeableConcept's JSON -> its Coded; charts repeat concepts
_CONCEPTS_LIMIT = 50_000
_CONCEPTS_CHARS = [0]  # characters of the texts and codings it holds


def concept_chars(value: Coded) -> int:
    """What a concept costs a memo, in characters (its texts and its codings' strings, plus a little each)."""
    return sum(len(t) for t in value.texts) + sum(
        16 + len(c.system) + len(c.code) + len(c.display) for c in value.codings)


def listed(value: Any) -> list[Any]:
    """Where FHIR JSON has an array: a list as it is, a lone object as a list of one (a common sender slip), and
    anything else (a number, a string, null) as empty."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    return []


def _concept_key(raw_codings: list[Any], text: Any) -> tuple[Any, ...] | None:
    """The memo key of a CodeableConcept's JSON: its text, then each coding's system, code and display, in one flat
    tuple (one tuple to build, hash and compare, not one per coding); None (not memoised) for an odd shape or a
    long text."""
    limit = _TEXT_LIMIT[0]
    if type(text) is str and len(text) > limit:
        return None
    if len(raw_codings) == 1:  # the usual concept: its tuple made at once
        c = raw_codings[0]
        if type(c) is not dict:
            return None
        display = c.get("display")
        if type(display) is str and len(display) > limit:
            return None
        return (text, c.get("system"), c.get("code"), display)
    parts: list[Any] = [text]
    for c in raw_codings:
        if type(c) is not dict:
            return None
        display = c.get("display")
        if type(display) is str and len(display) > limit:
            return None
        parts.append(c.get("system"))
        parts.append(c.get("code"))
        parts.append(display)
    return tuple(parts)


def coded(value: Any) -> Coded:
    """Read a CodeableConcept, an R5 CodeableReference, a Coding, a list of those, or a bare string."""
    if value is None:
        return EMPTY
    if isinstance(value, dict):
        raw_codings = value.get("coding")
        if raw_codings is None and isinstance(value.get("concept"), dict):  # R5 CodeableReference
            inner = coded(value["concept"])
            ref = value.get("reference")
            if isinstance(ref, dict) and isinstance(ref.get("display"), str):
                inner = inner.merged(Coded((), (ref["display"],)))
            return inner
        text = value.get("text")
        key = _concept_key(raw_codings, text) if type(raw_codings) is list else None
        if key is not None:
            try:
                found = _CONCEPTS.get(key)
            except TypeError:  # a list or object where a string belongs: read it, don't remember it
                key = found = None
            if found is not None:
                return found
        codings: tuple[Coding, ...] = ()
        if isinstance(raw_codings, list):
            codings = tuple(_coding(c) for c in raw_codings if isinstance(c, dict))
        elif "code" in value and ("system" in value or "display" in value):  # a bare Coding
            codings = (_coding(value),)
        result = Coded(codings, (text,) if isinstance(text, str) else ())
        if key is not None:
            chars = concept_chars(result)
            if len(_CONCEPTS) >= _CONCEPTS_LIMIT or _CONCEPTS_CHARS[0] + chars > MEMO_CHARS:
                _CONCEPTS.clear()
                _CONCEPTS_CHARS[0] = 0
            _CONCEPTS[key] = result
            _CONCEPTS_CHARS[0] += chars
        return result
    if isinstance(value, str):
        return Coded((), (value,))
    if isinstance(value, list):
        result = EMPTY
        for item in value:
            result = result.merged(coded(item))
        return result
    return EMPTY


def _coding(c: dict[str, Any]) -> Coding:
    system = c.get("system")
    code = c.get("code")
    display = c.get("display")
    return Coding(
        norm_system(system) if isinstance(system, str) else "",
        code.strip() if isinstance(code, str) else str(code) if isinstance(code, int) else "",
        display if isinstance(display, str) else "",
    )


def status_code(value: Any) -> str | None:
    """The code of a status element: a plain code (R4 MedicationRequest) or a CodeableConcept."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("coding"), list):
        for coding_ in value["coding"]:
            if isinstance(coding_, dict) and isinstance(coding_.get("code"), str) and coding_["code"]:
                return str(coding_["code"])
    c = coded(value)
    for coding in c.codings:
        if coding.code:
            return coding.code
    for text in c.texts:
        return fold(text)
    return None


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


def parse_date(value: Any) -> date | None:
    """A FHIR date/dateTime/instant as a calendar date (partial dates take the first day)."""
    if not isinstance(value, str):
        return None
    if len(value) >= 10 and value[4:5] == "-" and value[7:8] == "-":
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            pass
    m = _DATE.match(value.strip())
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1))
    except ValueError:
        return None


_ISO: dict[date, str] = {}  # a date -> its ISO text; records repeat few dates, and the text is built with sprintf


def iso(day: date) -> str:
    """`day.isoformat()`, remembered (at most 4,096 dates, then it starts again). A datetime is not remembered: two
    aware datetimes of the same instant are equal, and their texts differ."""
    if type(day) is not date:
        return day.isoformat()
    text = _ISO.get(day)
    if text is None:
        if len(_ISO) >= 4096:
            _ISO.clear()
        text = _ISO[day] = day.isoformat()
    return text


def parse_instant(value: Any) -> datetime | None:
    """A FHIR dateTime as an aware datetime, for ordering Observations; dates sort at midnight UTC."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) > 10:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        pass
    d = parse_date(text)
    return datetime(d.year, d.month, d.day, tzinfo=UTC) if d else None


_CHOICE_TYPES = ("DateTime", "Period", "Instant", "Date", "String", "Age", "Range", "Boolean", "CodeableConcept",
                 "Quantity", "Coding", "Integer")


_CHOICE_KEYS: dict[str, tuple[tuple[str, str], ...]] = {}


def choice(resource: dict[str, Any], prefix: str) -> tuple[str, Any] | None:
    """The populated choice element `prefix[x]`: ("DateTime", value), ("Period", {...}) ..."""
    keys = _CHOICE_KEYS.get(prefix)
    if keys is None:
        keys = _CHOICE_KEYS[prefix] = tuple((kind, prefix + kind) for kind in _CHOICE_TYPES)
    for kind, key in keys:
        if key in resource:
            value = resource[key]
            if value is not None:
                return kind, value
    return None


def choice_date(resource: dict[str, Any], prefix: str, *, end: bool = False) -> tuple[bool, date | None]:
    """(present, date) for onset[x]/abatement[x]/effective[x]; a Period gives its start (or end)."""
    value = resource.get(prefix + "DateTime")
    if value is not None:
        return True, parse_date(value)
    found = choice(resource, prefix)
    if found is None:
        return False, None
    kind, value = found
    if kind in ("Instant", "Date"):
        return True, parse_date(value)
    if kind == "Period" and isinstance(value, dict):
        first, second = ("end", "start") if end else ("start", "end")
        return True, parse_date(value.get(first)) or parse_date(value.get(second))
    return True, None


def reference(value: Any) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    return ref if isinstance(ref, str) else None


def ref_key(ref: str) -> str:
    """`Type/id` from a relative, absolute or versioned reference (`.../ServiceRequest/x/_history/2`)."""
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else ref
