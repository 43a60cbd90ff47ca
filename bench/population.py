"""Alert burden on the committed synthetic population (issue 18): one mesotherapy face order per living patient.

Reads fixtures/vocabularies/population/*.jsonl.gz (1,080 Synthea and carebundle patients, see
fixtures/vocabularies/README.md), screens each record in process with the service's own readers and rules
(no network), on the population's reference date, and prints, per topic and indicator, the share of patients
with a card, for everyone and for women aged 18-50.

    .venv/bin/python bench/population.py            # the table
    .venv/bin/python bench/population.py --samples 5  # and five patients per topic with the evidence

`tests/screening/test_population.py` runs the same screening in `make test` and checks what issue 18 asks of it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POPULATION = ROOT / "fixtures" / "vocabularies" / "population"
REFERENCE_DATE = date(2026, 11, 21)  # Synthea's pinned reference date (-r 20261121)
KEYS = {"Condition": "conditions", "AllergyIntolerance": "allergies", "Observation": "observations",
        "MedicationRequest": "medications", "MedicationStatement": "medications", "Medication": "medications"}


def patients() -> Iterator[dict[str, Any]]:
    for path in sorted(POPULATION.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def screen(kb: Any, settings: Any, entry: dict[str, Any]) -> tuple[dict[str, Any], list[Any]] | None:
    """(Patient, findings) for one living patient, or None for a deceased one."""
    from cds.fhir.prefetch import Gathered
    from cds.knowledge.policy import ClinicalPolicy
    from cds.screening.orders import draft_resources, find_mesotherapy
    from cds.screening.record import build_record
    from cds.screening.rules import evaluate

    data: dict[str, list[dict[str, Any]]] = {"patient": [], "conditions": [], "allergies": [], "observations": [],
                                             "medications": []}
    for r in entry["resources"]:
        if r.get("resourceType") == "Patient":
            data["patient"].append(r)
        elif r.get("resourceType") in KEYS:
            data[KEYS[r["resourceType"]]].append(r)
    patient = data["patient"][0]
    if patient.get("deceasedDateTime") or patient.get("deceasedBoolean"):
        return None
    order = {"resourceType": "ServiceRequest", "id": "sr-1", "status": "draft", "intent": "order",
             "code": {"coding": [{"system": "https://mesotherapy-cds.org/fhir/CodeSystem/orderables",
                                  "code": "mesotherapy-face"}], "text": "Mesotherapy - face"}}
    drafts = draft_resources({"resourceType": "Bundle", "entry": [{"resource": order}]})
    orders = find_mesotherapy(kb, "order-select", drafts, ["ServiceRequest/sr-1"])
    record = build_record(Gathered(data, {}, set(), []), str(patient.get("id")), {"ServiceRequest/sr-1"})
    return patient, evaluate(kb, record, orders, REFERENCE_DATE, ClinicalPolicy.from_settings(settings))


def woman_18_50(patient: dict[str, Any]) -> bool:
    born = patient.get("birthDate", "")
    if patient.get("gender") != "female" or len(born) < 4:
        return False
    age = REFERENCE_DATE.year - int(born[:4])
    return 18 <= age <= 50


def run(samples: int = 0) -> dict[str, Any]:
    from cds.knowledge.loader import load_knowledge
    from cds.settings import Settings

    settings = Settings(env="dev")
    kb = load_knowledge(ROOT / "cards")
    counts: dict[str, Counter[str]] = {"all": Counter(), "women 18-50": Counter()}
    totals: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for entry in patients():
        screened = screen(kb, settings, entry)
        if screened is None:
            totals["deceased"] += 1
            continue
        patient, findings = screened
        groups = ["all"] + (["women 18-50"] if woman_18_50(patient) else [])
        for g in groups:
            totals[g] += 1
        any_card = False
        for f in findings:
            any_card = True
            for g in groups:
                counts[g][f"{f.rule.id}|{f.indicator}"] += 1
            if len(examples.setdefault(f.rule.id, [])) < samples:
                evidence = "; ".join(f"{e.what} ({e.ref.split('/')[0]}, {e.status}"
                                     f"{', ' + ', '.join(e.notes) if e.notes else ''})" for e in f.evidence[:4])
                examples[f.rule.id].append(f"{patient.get('gender')} born {patient.get('birthDate')}: "
                                           f"{f.indicator}: {evidence}")
        if any_card:
            for g in groups:
                counts[g]["any card|"] += 1
    return {"counts": counts, "totals": totals, "examples": examples}


def table(result: dict[str, Any]) -> str:
    counts, totals = result["counts"], result["totals"]
    keys = sorted(set(counts["all"]) | set(counts["women 18-50"]), key=lambda k: (k.startswith("any"), k))
    lines = [f"| topic | indicator | all living ({totals['all']}) | women 18-50 ({totals['women 18-50']}) |",
             "|---|---|---|---|"]
    for k in keys:
        topic, indicator = k.split("|")
        cells = [f"{100 * counts[g][k] / max(totals[g], 1):.1f} % ({counts[g][k]})" for g in ("all", "women 18-50")]
        lines.append(f"| {topic} | {indicator or '-'} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=0, help="patients per topic to print with their evidence")
    args = parser.parse_args()
    result = run(args.samples)
    sys.stdout.write(table(result) + f"\n\ndeceased, not screened: {result['totals']['deceased']}\n")
    for topic, lines in sorted(result["examples"].items()):
        sys.stdout.write(f"\n## {topic}\n" + "".join(f"- {x}\n" for x in lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
