"""Parse a cards/ YAML file; the value sets' generated code blocks are read line by line, into the same data.

fixtures/vocabularies/apply.py writes thousands of code entries between `# audit:begin` and `# audit:end`, one
flow mapping a line in one fixed shape. PyYAML builds Python objects for every node even with libyaml (about 80 µs
an entry: half a second for cancer.yaml alone), so a block whose every line has exactly that shape is read with a
regular expression; the rest of the file, and a whole file with any block line in another shape, is PyYAML's.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_BLOCK = re.compile(r"^(\w+):\n  # audit:begin\n(.*?)^  # audit:end\n", re.MULTILINE | re.DOTALL)
# Inside the double quotes: characters YAML reads as themselves (printable, no line break or BOM, no " or \), or
# the two escapes apply.py writes (\\ and \"). Anything else (another escape, a tab, a control character) is
# left to PyYAML.
_CHAR = r"[\x20\x21\x23-\x5b\x5d-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
_QUOTED = rf'"((?:{_CHAR}|\\[\\"])*)"'
_ENTRY = re.compile(rf"  - \{{system: (snomed|loinc|icd10cm|rxnorm|atc), (code|prefix): {_QUOTED}, "
                    rf"display: {_QUOTED}, verified: (V|V2|derived|local), source: {_QUOTED}\}}")
_ESCAPE = re.compile(r"\\([\\\"])")


class _LeaveToPyYAML(Exception):
    """A generated block this module does not read exactly as PyYAML would."""


def _entry(m: re.Match[str]) -> dict[str, str]:
    system, kind, code, display, verified, source = m.groups()
    return {"system": system, kind: _ESCAPE.sub(r"\1", code), "display": _ESCAPE.sub(r"\1", display),
            "verified": verified, "source": _ESCAPE.sub(r"\1", source)}


def _read_blocks(text: str) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """The text with each generated block's lines cut out, and the entries they hold, per top-level key."""
    blocks: dict[str, list[dict[str, str]]] = {}

    def cut(m: re.Match[str]) -> str:
        key = m.group(1)
        if key in blocks or len(re.findall(rf"^{key}:", text, re.MULTILINE)) != 1:
            raise _LeaveToPyYAML
        entries = []
        for line in m.group(2).split("\n")[:-1]:
            found = _ENTRY.fullmatch(line)
            if found is None:
                raise _LeaveToPyYAML
            entries.append(_entry(found))
        blocks[key] = entries
        return m.group(0) if not entries else f"{key}:\n"

    return _BLOCK.sub(cut, text), blocks


def read_yaml(text: str) -> Any:
    """What `yaml.load(text, Loader=LOADER)` gives (yaml.YAMLError on what it refuses), faster on generated code
    lists."""
    try:
        rest, blocks = _read_blocks(text)
    except _LeaveToPyYAML:
        return yaml.load(text, Loader=LOADER)  # noqa: S506 - a safe loader
    data = yaml.load(rest, Loader=LOADER)  # noqa: S506 - a safe loader
    for key, entries in blocks.items():
        if not entries:
            continue  # the block's markers were left in place
        tail = data.get(key) if isinstance(data, dict) else False
        if tail is None:  # the block was the whole list
            data[key] = entries
        elif isinstance(tail, list):  # hand-written entries follow the block
            data[key] = entries + tail
        else:
            return yaml.load(text, Loader=LOADER)  # noqa: S506 - not a list after all: PyYAML's reading
    return data
