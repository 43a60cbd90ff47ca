"""The `cds` command: screen a file, fire a hook at any CDS service, measure alert burden over a population,
check the knowledge in cards/.

Exit codes: 0 done; 1 the service called answered an error or could not be reached; 2 bad input or usage (a file
that is not FHIR, unknown options, invalid knowledge): one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console, Group
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..screening import bundles
from ..screening.bundles import NotFhir

INDICATOR_STYLE = {"critical": "bold red", "warning": "yellow", "info": "blue"}
INDICATOR_RANK = {"info": 0, "warning": 1, "critical": 2}
ORDERABLE_HELP = "orderable code from cards/orderables.yaml (mesotherapy-face, mesotherapy-scalp, ...)"


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"cds: error: {message}", err=True)
    sys.exit(code)


def _settings(knowledge_dir: Path | None = None) -> Any:
    from pydantic import ValidationError

    from ..settings import Settings

    overrides: dict[str, Any] = {} if "CDS_ENV" in os.environ else {"env": "dev"}  # a local tool: dev unless told
    if knowledge_dir is not None:
        overrides["knowledge_dir"] = knowledge_dir
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        fail(f"invalid settings: {exc.errors()[0]['msg']}")


def _knowledge(settings: Any) -> Any:
    from ..errors import ConfigError, KnowledgeError
    from ..knowledge.loader import load_knowledge

    try:
        return load_knowledge(settings.knowledge_dir, env=settings.env).with_overrides(settings.silent_rules,
                                                                                       settings.active_rules)
    except (KnowledgeError, ConfigError) as exc:
        fail(f"invalid knowledge in {settings.knowledge_dir}: {' '.join(str(exc).split())}")


def _request_from(path: Path, kb: Any, orderable: str, products: list[str], hook: str) -> dict[str, Any]:
    """A hook request from a file: a request as it is, or a patient Bundle with a draft order added."""
    kind, doc = bundles.classify(bundles.read_json(path), str(path))
    if kind == "request":
        return doc
    return bundles.hook_request(kb, doc, orderable=orderable, products=products, hook=hook)


class Local:
    """The service's screening, in this process (no server, no FHIR server: requests carry their data)."""

    def __init__(self, settings: Any, kb: Any) -> None:
        from ..knowledge.policy import ClinicalPolicy
        from ..screening.pipeline import Screening

        self.screening = Screening(kb, ClinicalPolicy.from_settings(settings), settings)
        self.settings = settings

    async def screen(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        import aiohttp

        from ..requests import validate_request

        body = validate_request(body)
        async with aiohttp.ClientSession(trust_env=False) as http:  # only for a request that lacks prefetch
            base = (self.settings.public_base_url or "http://127.0.0.1:8080").rstrip("/")  # `make run`s address
            screened = await self.screening.screen(body, http, base)
        if screened.refused is not None:
            raise screened.refused
        return screened.cards, screened.silent


# ---------------------------------------------------------------------------------------------- rendering

def card_panel(card: dict[str, Any], *, silent: bool = False) -> Panel:
    indicator = card.get("indicator", "info")
    style = INDICATOR_STYLE.get(indicator, "")
    topic = card.get("source", {}).get("topic", {})
    title = Text.assemble((f" {indicator.upper()} ", f"reverse {style}"), " ", (card.get("summary", ""), "bold"))
    parts: list[Any] = []
    if card.get("detail"):
        parts.append(Markdown(card["detail"]))
    suggestions = card.get("suggestions") or []
    if suggestions:
        parts.append(Text("Suggestions: " + "  |  ".join(s.get("label", "") for s in suggestions), style="cyan"))
    reasons = card.get("overrideReasons") or []
    if reasons:
        parts.append(Text("Override reasons: " + "; ".join(r.get("display") or r.get("code", "") for r in reasons),
                          style="dim"))
    for link in card.get("links") or []:
        parts.append(Text(f"{link.get('label', '')}: {link.get('url', '')}", style="dim underline"))
    subtitle = f"{topic.get('code', '')}" + (" (silent: recorded, not shown)" if silent else "")
    return Panel(Group(*parts), title=title, title_align="left", subtitle=subtitle, subtitle_align="right",
                 border_style=style)


def print_cards(console: Console, cards: list[dict[str, Any]], silent: list[dict[str, Any]] | None = None) -> None:
    if not cards:
        console.print("[green]No cards:[/] nothing to report for this order.")
    for c in cards:
        console.print(card_panel(c))
    for c in silent or []:
        console.print(card_panel(c, silent=True))


# ------------------------------------------------------------------------------------------------ commands

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mesotherapy-cds", prog_name="cds")
def main() -> None:
    """Mesotherapy contraindication screening (CDS Hooks 2.0) from the command line.

    FILE arguments take a CDS Hooks request (order-select or order-sign), a test scenario, or a patient's FHIR
    Bundle (Synthea, carebundle, an EHR export), to which a draft mesotherapy order is added. Settings come
    from the same CDS_* variables as the service (CDS_KNOWLEDGE_DIR, CDS_SILENT_RULES, ...).
    """


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--order", "orderable", default="mesotherapy-face", show_default=True, help=ORDERABLE_HELP)
@click.option("--product", "products", multiple=True, metavar="INGREDIENT",
              help="an ingredient of the product, from cards/ingredients.yaml (lidocaine, vitamins, ...); repeatable")
@click.option("--hook", type=click.Choice(["order-select", "order-sign"]), default="order-select", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the CDS Hooks response as JSON")
@click.option("--show-silent", is_flag=True, help="also print the cards of rules in silent mode")
def screen(file: Path, orderable: str, products: tuple[str, ...], hook: str, as_json: bool,
           show_silent: bool) -> None:
    """Screen FILE in this process and print the cards as a clinician reads them."""
    from ..errors import CDSError

    settings = _settings()
    kb = _knowledge(settings)
    try:
        body = _request_from(file, kb, orderable, list(products), hook)
        cards, silent = asyncio.run(Local(settings, kb).screen(body))
    except NotFhir as exc:
        fail(str(exc))
    except CDSError as exc:
        fail(f"{file}: {exc.message}")
    if as_json:
        click.echo(json.dumps({"cards": cards}, indent=2, ensure_ascii=False))
        return
    print_cards(Console(highlight=False), cards, silent if show_silent else None)


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        fail(f"{path}: not an unencrypted PEM private key ({type(exc).__name__})")


def client_jwt(url: str, key_file: Path, issuer: str, kid: str | None, alg: str | None,
               tenant: str | None) -> str:
    """CDS Hooks "Trusting CDS Clients": a short-lived JWT for exactly this endpoint."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = _load_key(key_file)
    if alg is None:
        alg = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384" if isinstance(
            key, rsa.RSAPrivateKey) else None
        if alg is None:
            fail(f"{key_file}: only RSA and EC keys sign CDS Hooks JWTs")
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer, "sub": issuer, "aud": url, "iat": now, "exp": now + 300,
                              "jti": uuid.uuid4().hex}
    if tenant:
        claims["tenant"] = tenant
    headers = {"typ": "JWT", **({"kid": kid} if kid else {})}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


@main.command()
@click.argument("url")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--order", "orderable", default="mesotherapy-face", show_default=True, help=ORDERABLE_HELP)
@click.option("--product", "products", multiple=True, metavar="INGREDIENT", help="an ingredient; repeatable")
@click.option("--hook", type=click.Choice(["order-select", "order-sign"]), default="order-select", show_default=True)
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False),
              help="PEM private key (RSA or EC) to sign the client JWT with")
@click.option("--iss", "issuer", help="the JWT's issuer (required with --key)")
@click.option("--kid", help="key id in the JWT header (the kid of the key in the issuer's JWKS)")
@click.option("--alg", type=click.Choice(["RS256", "RS384", "PS256", "PS384", "ES256", "ES384"]),
              help="signing algorithm (default: RS384 for RSA keys, ES384 for EC keys)")
@click.option("--tenant", help="tenant claim, for services that check it")
@click.option("--timeout", default=10.0, show_default=True, help="seconds to wait for the answer")
@click.option("--json", "as_json", is_flag=True, help="print the response body as JSON")
def fire(url: str, file: Path, orderable: str, products: tuple[str, ...], hook: str, key_file: Path | None,
         issuer: str | None, kid: str | None, alg: str | None, tenant: str | None, timeout: float,
         as_json: bool) -> None:
    """Send FILE's hook to the CDS service at URL (…/cds-services/<id>) and show the answer.

    Exit code 1 when the service answers with an error or cannot be reached.
    """
    import httpx

    if not url.startswith(("http://", "https://")):
        fail(f"URL must be an http(s) URL of a CDS service, not {url!r}")
    if key_file is not None and not issuer:
        fail("--iss is required with --key")
    settings = _settings()
    kb = _knowledge(settings)
    try:
        body = _request_from(file, kb, orderable, list(products), hook)
    except NotFhir as exc:
        fail(str(exc))
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key_file is not None:
        headers["Authorization"] = "Bearer " + client_jwt(url, key_file, issuer or "", kid, alg, tenant)
    started = time.perf_counter()
    try:
        response = httpx.post(url, content=json.dumps(body), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        fail(f"{url}: no answer ({type(exc).__name__}: {exc})", code=1)
    ms = (time.perf_counter() - started) * 1000
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if as_json:
        click.echo(json.dumps(answer, indent=2, ensure_ascii=False) if answer is not None else response.text)
        sys.exit(0 if response.status_code == 200 else 1)
    console = Console(highlight=False)
    console.print(f"HTTP {response.status_code} from {url} in {ms:.0f} ms", style="dim")
    if response.status_code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("cards"), list):
        issues = answer.get("issue") if isinstance(answer, dict) else None
        if isinstance(issues, list) and issues:
            text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues if isinstance(i, dict))
        else:
            text = response.text[:300]
        fail(f"the service answered {response.status_code}: {text}", code=1)
    print_cards(console, answer["cards"])


def _plain(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown.replace("**", "").replace("`", "")).strip()


def evidence_lines(card: dict[str, Any]) -> list[str]:
    """The card's "Found" lines, as plain text, and its last line of record references."""
    out, inside = [], False
    for line in card.get("detail", "").splitlines():
        if line.startswith("**Found:**"):
            inside = True
            rest = line[len("**Found:**"):].strip()
            if rest:
                out.append(_plain(rest))
        elif inside and line.startswith("- "):
            out.append(_plain(line[2:]))
        elif inside and not line.strip():
            inside = False
        elif line.startswith("_Records:"):
            out.append(_plain(line.strip("_")))
    return out


def _files(directory: Path) -> list[Path]:
    """The patient files under DIRECTORY: Bundles (*.json) and population files (*.jsonl.gz)."""
    found = [p for pattern in ("*.json", "*.jsonl.gz") for p in directory.rglob(pattern) if p.is_file()]
    return sorted(found)


def _lines(path: Path) -> Iterator[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        yield from f


def _count(path: Path) -> int:
    """The number of patients in a file (lines of a *.jsonl.gz; 0 when it cannot be read: skipped later)."""
    if not path.name.endswith(".jsonl.gz"):
        return 1
    try:
        return sum(1 for line in _lines(path) if line.strip())
    except (OSError, EOFError, UnicodeDecodeError):
        return 0


def _patients(path: Path) -> Iterator[tuple[str, dict[str, Any] | NotFhir]]:
    """(name, patient Bundle or the reason it is not one) for each patient of a file.

    A *.json file is one Bundle; each line of a *.jsonl.gz file (the committed population's format) is
    {"patient": id, "resources": [FHIR resources]}, made into a Bundle of those resources.
    """
    if not path.name.endswith(".jsonl.gz"):
        try:
            kind, doc = bundles.classify(bundles.read_json(path), str(path))
        except NotFhir as exc:
            yield path.stem, exc
            return
        yield path.stem, doc if kind == "bundle" else NotFhir(f"{path}: a hook request, not a patient Bundle")
        return
    n = 0
    try:
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                entry = json.loads(line)
            except ValueError as exc:
                yield where, NotFhir(f"{where}: not JSON ({exc})")
                continue
            found = entry.get("resources") if isinstance(entry, dict) else None
            if not isinstance(found, list):
                yield where, NotFhir(f'{where}: not {{"patient": id, "resources": [...]}}')
                continue
            bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in found]}
            try:
                _, doc = bundles.classify(bundle, where)
            except NotFhir as exc:
                yield where, exc
                continue
            yield str(entry.get("patient") or where), doc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        yield f"{path} line {n + 1}", NotFhir(f"{path}: cannot read the file after line {n} ({type(exc).__name__})")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--order", "orderable", default="mesotherapy-face", show_default=True, help=ORDERABLE_HELP)
@click.option("--product", "products", multiple=True, metavar="INGREDIENT", help="an ingredient; repeatable")
@click.option("--samples", default=2, show_default=True, help="example patients shown per topic")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
def population(directory: Path, orderable: str, products: tuple[str, ...], samples: int, fmt: str) -> None:
    """Run the rules over every patient in DIRECTORY: the alert burden before go-live.

    Reads patient Bundles (*.json) and the committed population's files (*.jsonl.gz, one patient a line:
    {"patient": id, "resources": [...]}). Prints, per topic and indicator, how many patients would get a card
    (silent rules included and marked), and a sample of why. Files or lines that are not a patient are skipped
    and counted.
    """
    if not directory.is_dir():
        fail(f"{directory}: no such directory")
    settings = _settings()
    kb = _knowledge(settings)
    local = Local(settings, kb)
    files = _files(directory)
    if not files:
        fail(f"{directory}: no *.json or *.jsonl.gz files")
    err = Console(stderr=True)
    counts: Counter[tuple[str, str]] = Counter()
    any_card: Counter[str] = Counter()
    why: dict[str, list[tuple[str, str, list[str]]]] = defaultdict(list)
    skipped: list[str] = []
    deceased = 0
    screened = 0

    async def run_all(progress: Progress, task: Any) -> None:
        for path in files:
            progress.update(task, description=path.name[:40])
            for name, doc in _patients(path):
                await one(name, doc, progress, task)

    async def one(name: str, doc: dict[str, Any] | NotFhir, progress: Progress, task: Any) -> None:
        nonlocal screened, deceased
        try:
            if isinstance(doc, NotFhir):
                raise doc
            body = bundles.hook_request(kb, doc, orderable=orderable, products=list(products))
            patient = body["prefetch"]["patient"]
            if patient.get("deceasedBoolean") is True or patient.get("deceasedDateTime"):
                deceased += 1  # nobody orders mesotherapy for them: not part of the population
                progress.advance(task)
                return
            cards, silent = await local.screen(body)
        except NotFhir as exc:
            skipped.append(str(exc))
            progress.advance(task)
            return
        screened += 1
        worst = max((INDICATOR_RANK[c["indicator"]] for c in cards + silent), default=-1)
        if worst >= 0:
            any_card["any"] += 1
            if worst == 2:
                any_card["critical"] += 1
        for c in cards + silent:
            topic = c["source"]["topic"]["code"]
            counts[(topic, c["indicator"])] += 1
            if len(why[topic]) < samples:
                why[topic].append((name, c["indicator"], evidence_lines(c)[:2]))
        progress.advance(task)

    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("patients", total=sum(_count(p) for p in files))
        started = time.perf_counter()
        asyncio.run(run_all(progress, task))
        elapsed = time.perf_counter() - started
    if screened == 0:
        fail(f"{directory}: no patient among {len(files)} files ({skipped[0] if skipped else 'only deceased'})")

    rows = []
    for rule in kb.rules:
        for level in ("critical", "warning", "info"):
            n = counts.get((rule.id, level), 0)
            if n:
                rows.append({"topic": rule.id, "indicator": level, "patients": n, "rate": n / screened,
                             "silent": rule.id in kb.silent})
    result = {"patients": screened, "skipped": len(skipped), "deceased": deceased, "order": orderable,
              "seconds": round(elapsed, 2),
              "with_any_card": any_card["any"], "with_critical_card": any_card["critical"], "rows": rows,
              "samples": {t: [{"patient": p, "indicator": i, "evidence": e} for p, i, e in s] for t, s in why.items()}}
    if fmt == "json":
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if fmt == "markdown":
        click.echo("| topic | indicator | patients | rate |\n|---|---|---:|---:|")
        for r in rows:
            click.echo(f"| `{r['topic']}`{' (silent)' if r['silent'] else ''} | {r['indicator']} | {r['patients']} "
                       f"| {r['rate']:.1%} |")
        click.echo(f"| any card | | {any_card['any']} | {any_card['any'] / screened:.1%} |")
        click.echo(f"| a critical card | | {any_card['critical']} | {any_card['critical'] / screened:.1%} |")
        click.echo(f"\n{screened} living patients, order `{orderable}`, {elapsed:.1f} s"
                   + (f"; {deceased} deceased patients left out" if deceased else "")
                   + (f"; {len(skipped)} skipped (not a patient Bundle)" if skipped else ""))
        return
    console = Console(highlight=False)
    table = Table(title=f"Alert burden: {screened} patients, order {orderable}")
    for name, justify in (("topic", "left"), ("indicator", "left"), ("patients", "right"), ("rate", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["topic"] + (" (silent)" if r["silent"] else ""),
                      Text(r["indicator"], style=INDICATOR_STYLE[r["indicator"]]), str(r["patients"]),
                      f"{r['rate']:.1%}")
    table.add_section()
    table.add_row("any card", "", str(any_card["any"]), f"{any_card['any'] / screened:.1%}")
    table.add_row("a critical card", "", str(any_card["critical"]), f"{any_card['critical'] / screened:.1%}")
    console.print(table)
    console.print(f"{screened} patients screened in {elapsed:.1f} s ({elapsed / screened * 1000:.0f} ms each)")
    if deceased:
        console.print(f"{deceased} deceased patients left out (nobody orders mesotherapy for them)")
    if skipped:
        console.print(f"[yellow]{len(skipped)} skipped[/] (not a patient Bundle), e.g. {skipped[0]}")
    if why:
        console.print("\n[bold]Why (a sample per topic)[/]")
        for topic, found in why.items():
            for patient, level, lines in found:
                console.print(Text.assemble(f"{topic} ", (level, INDICATOR_STYLE[level]), f" {patient}: ",
                                            "; ".join(lines) or "(no evidence lines)"))


LEAF_WORDS = {
    "condition": "Conditions", "observation": "Observations", "medication": "MedicationRequests/Statements",
    "allergy": "AllergyIntolerances",
    "ingredient_allergy": "AllergyIntolerances against the ordered product's ingredients",
    "weaned": "breastfeeding records (ended within CDS_WEANING_WAIT_MONTHS)",
    "pregnancy_status_unknown": "Patient sex and age, and the absence of recent pregnancy records",
    "screening_incomplete": "data the service could not obtain",
}


def _describe(kb: Any, node: Any) -> list[str]:
    """What one rule reads, leaf by leaf: the kind of record, and every value set and setting the leaf names
    (read from the leaf's fields, so a new field of the rule grammar shows without a change here)."""
    children = getattr(node, "any", None)
    if isinstance(children, list):
        return [line for child in children for line in _describe(kb, child)]
    kind, spec = next(iter(node.__dict__.items()))
    parts: list[str] = []

    def visit(name: str, value: Any) -> None:
        label = name.rstrip("_")
        if isinstance(value, str) and value in kb.valuesets:
            parts.append(f"{label} {value}")
        elif isinstance(value, str) and name.endswith("_setting"):
            parts.append(f"CDS_{value.upper()}")
        elif isinstance(value, list):
            for item in value:
                visit(name, item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for sub, v in value.__dict__.items():
                visit(f"{name}.{sub}", v)
        elif value is True:
            parts.append(label)

    for name, value in getattr(spec, "__dict__", {}).items():
        visit(name, value)
    return [LEAF_WORDS.get(kind, kind) + (f" [{'; '.join(parts)}]" if parts else "")]


@main.group()
def knowledge() -> None:
    """The clinical knowledge in cards/."""


@knowledge.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="the knowledge directory (default: CDS_KNOWLEDGE_DIR, else cards/)")
def check(directory: Path | None) -> None:
    """Validate the knowledge as the service does at start-up, and print what each rule reads."""
    settings = _settings(directory)
    kb = _knowledge(settings)
    console = Console(highlight=False)
    console.print(f"[bold]{len(kb.rules)} rules in {settings.knowledge_dir}[/] (value sets by id, in valuesets/)\n")
    for rule in sorted(kb.rules, key=lambda r: r.id):
        console.print(Text.assemble((rule.id, "bold"), f"  v{rule.version}  {kb.status(rule)}  ",
                                    (rule.indicator, INDICATOR_STYLE[rule.indicator]), f"  {rule.title}"))
        for line in _describe(kb, rule.when):
            console.print(Text("    reads " + line))
        if rule.suppressed_by:
            console.print(Text("    not shown when " + ", ".join(rule.suppressed_by) + " fires", style="dim"))
    silent = f", {len(kb.silent)} silent ({', '.join(sorted(kb.silent))})" if kb.silent else ""
    console.print(f"[green]knowledge OK[/]: {len(kb.rules)} rules{silent}, {len(kb.valuesets)} value sets, "
                  f"{len(kb.orderables.orderables)} orderables, {len(kb.ingredients)} ingredients")


if __name__ == "__main__":
    main()
