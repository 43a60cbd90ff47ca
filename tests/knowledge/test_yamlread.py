"""The generated code blocks are read line by line into exactly what PyYAML reads from them, or left to PyYAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cds.knowledge.yamlread import LOADER, read_yaml

from conftest import ROOT

CARDS = ROOT / "cards"
LINE = ('  - {system: snomed, code: "1010603001", display: "Primary mucoepidermoid carcinoma", verified: V, '
        'source: "[Q24] VSAC"}')
HAND = "  - {system: loinc, code: 1-8, display: x, verified: local}\n"


def pyyaml(text: str) -> object:
    return yaml.load(text, Loader=LOADER)


def block(key: str = "codes", *lines: str) -> str:
    """A generated block as apply.py writes it, heading the `key:` list."""
    return f"{key}:\n  # audit:begin\n" + "".join(line + "\n" for line in lines) + "  # audit:end\n"


def display(text: str) -> str:
    """LINE with another display, written as is between the double quotes."""
    return LINE.replace("Primary mucoepidermoid carcinoma", text)


@pytest.mark.parametrize("path", sorted(CARDS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CARDS)))
def test_every_cards_file_reads_as_pyyaml_reads_it(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert read_yaml(text) == pyyaml(text)


def test_the_generated_blocks_of_cards_take_the_line_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """cancer.yaml's thousands of generated entries never reach PyYAML (that is the start-up time saved)."""
    text = (CARDS / "valuesets" / "cancer.yaml").read_text(encoding="utf-8")
    seen: list[str] = []
    real = yaml.load

    def spy(stream: str, Loader: type) -> object:
        seen.append(stream)
        return real(stream, Loader=Loader)

    monkeypatch.setattr(yaml, "load", spy)
    data = read_yaml(text)
    assert len(data["codes"]) > 6000
    assert len(seen) == 1 and "1010603001" not in seen[0] and "# audit:begin" not in seen[0]


BLOCKS = {
    "one entry": "id: x\n" + block("codes", LINE),
    "escapes": block("codes", display(r"a \"quoted\" back\\slash")),
    "non-ASCII": block("codes", display("Ung thư vú, Bösartige Neubildung, \U0001d518")),
    "hand-written after the block": block("codes", LINE) + HAND + "prefixes:\n",
    "empty block before hand-written": block("codes") + HAND,
    "empty block alone": block("codes") + "text: [a]\n",
    "two blocks": block("codes", LINE, LINE) + block("prefixes", LINE.replace("code:", "prefix:")),
    "another escape": block("codes", display(r"tab\there")),
    "a tab inside quotes": block("codes", display("tab\there")),
    "a line break character inside quotes": block("codes", display("line\u2028break")),
    "another shape": block("codes", LINE, "  - {system: snomed, code: 1, display: x, verified: V}"),
    "an unquoted value": block("codes", LINE.replace('"1010603001"', "1010603001")),
    "a comment in the block": block("codes", "  # note", LINE),
    "the key twice": block("codes", LINE) + "codes:\n  - 1\n",
    "not a list after the block": block("codes", LINE).replace("  # audit:end\n", "  # audit:end\n  a: 1\n"),
    "crlf": block("codes", LINE).replace("\n", "\r\n"),
    "no end marker": "codes:\n  # audit:begin\n" + LINE + "\n",
}


@pytest.mark.parametrize("text", BLOCKS.values(), ids=BLOCKS.keys())
def test_generated_blocks_read_as_pyyaml_reads_them(text: str) -> None:
    try:
        expected = pyyaml(text)
    except yaml.YAMLError:
        with pytest.raises(yaml.YAMLError):
            read_yaml(text)
        return
    assert read_yaml(text) == expected


def test_what_pyyaml_refuses_is_refused() -> None:
    with pytest.raises(yaml.YAMLError):
        read_yaml(block("codes", LINE) + "text: [unclosed\n")
    with pytest.raises(yaml.YAMLError):
        read_yaml(block("codes", display("bell\x07")))
