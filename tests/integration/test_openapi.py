"""/openapi.json describes the API, real answers conform to it, and a bounded schemathesis run against the real
service (every operation, 20 cases each, fixed seed) finds no 5xx and no answer off the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from conftest import Service, load_fixture

SERVICE = "/cds-services/mesotherapy-contraindications"


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_openapi_describes_every_endpoint(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/cds-services", "/cds-services/{service_id}", "/cds-services/{service_id}/feedback",
            "/feedback/summary", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    jsonschema.Draft202012Validator.check_schema({"components": doc["components"]})


def test_real_answers_conform_to_the_schemas(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    request = load_fixture("requests/order-select-example.json")
    validator(doc, "HookRequest").validate(request)
    answer = client.post(SERVICE, json=request).json()
    assert answer["cards"]
    validator(doc, "HookResponse").validate(answer)
    validator(doc, "Discovery").validate(client.get("/cds-services").json())
    validator(doc, "Summary").validate(client.get("/feedback/summary").json())
    bad = client.post(SERVICE, json={"hook": "order-select"}).json()
    validator(doc, "OperationOutcome").validate(bad)
    card = answer["cards"][0]
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                              "outcomeTimestamp": "2026-11-21T09:00:00Z"}]}
    validator(doc, "FeedbackRequest").validate(feedback)
    validator(doc, "FeedbackResponse").validate(client.post(SERVICE + "/feedback", json=feedback).json())


def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    with Service({"CDS_ENV": "dev"}) as svc:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{svc.base_url}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
             "content_type_conformance",
             "--max-examples", "20", "--seed", "1", "--workers", "1", "--request-timeout", "10",
             "--generation-database", "none", "--no-color",
             "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
