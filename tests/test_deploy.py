"""deploy/: the Dockerfile, the compose file and the Kubernetes manifests, checked statically.

No container engine or cluster runs on the development and CI machines, so these tests parse every file and
check what would otherwise only fail at deploy time: probes on real endpoints and the right port, resource
limits, a non-root image whose command starts the app, selectors that match, settings that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from cds.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAME = "mesotherapy-cds"


# ---------------------------------------------------------------------------------------------- loading

def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(load_docs(path))
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def by_name(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} named {name!r} in deploy/k8s"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def main_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"named port {port!r} not declared by container {container['name']}")


def settings_env_names() -> set[str]:
    return {f"CDS_{name.upper()}" for name in Settings.model_fields}


# --------------------------------------------------------------------------------------------- Dockerfile

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), with continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((instruction, args.strip()))
    return stages


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage:
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args)))
    return {k: v.strip('"') for k, v in env.items()}


def test_dockerfile_is_multi_stage_from_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    froms = [stage[0][1] for stage in stages]
    assert re.fullmatch(r"python:3\.11-slim\s+AS\s+builder", froms[0], re.IGNORECASE), froms[0]
    assert froms[-1].split()[0] == "python:3.11-slim"
    final = stages[-1]
    assert any(i == "COPY" and "--from=builder" in a for i, a in final), "runtime must copy the builder's output"
    assert not any(i == "RUN" and re.search(r"\b(gcc|build-essential)\b", a) for i, a in final)


def test_dockerfile_runtime_runs_the_app_as_non_root() -> None:
    final = dockerfile_stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    cmds = [a for i, a in final if i == "CMD"]
    assert cmds and json.loads(cmds[-1])[:3] == ["python", "-m", "cds"]
    env = env_of(final)
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8080"
    assert env.get("CDS_ENV") == "prod"
    assert [a for i, a in final if i == "EXPOSE"] == [env["PORT"]]
    # the installed package's default knowledge dir would point into site-packages: the image must set it
    assert env["CDS_KNOWLEDGE_DIR"] and any(i == "COPY" and a.split()[-1] == env["CDS_KNOWLEDGE_DIR"]
                                            for i, a in final)
    assert {k for k in env if k.startswith("CDS_")} <= settings_env_names()


def test_docker_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = set()
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction == "COPY" and "--from=" not in args:
                sources.update(args.split()[:-1])
    assert sources == {"requirements.lock", "pyproject.toml", "setup.py", "cds", "cards"}
    assert sources <= kept
    for source in sources:
        assert (ROOT / source).exists()


# ------------------------------------------------------------------------------------------------ compose

def compose() -> dict[str, Any]:
    docs = load_docs(DEPLOY / "compose.yaml")
    assert len(docs) == 1
    return docs[0]


def test_compose_runs_the_service_against_postgres_16() -> None:
    services = compose()["services"]
    db = services["postgres"]
    assert str(db["image"]).startswith("postgres:16")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    app = services["cds"]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    build = app["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()

    env = app["environment"]
    url = make_url(re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", env["CDS_DATABASE_URL"]))
    assert url.get_backend_name() == "postgresql"
    assert url.host == "postgres" and (url.port or 5432) == 5432
    assert url.username == db["environment"]["POSTGRES_USER"]
    assert url.database == db["environment"]["POSTGRES_DB"]
    assert Settings(database_url=env["CDS_DATABASE_URL"]).sqlalchemy_url.startswith("postgresql+asyncpg://")
    assert env["CDS_ENV"] == "prod" and env["PORT"] == "8080"
    assert {k for k in env if k.startswith("CDS_")} <= settings_env_names()
    assert any(p.endswith(":8080") for p in app["ports"])


# ------------------------------------------------------------------------------------------- Kubernetes

def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 8
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.parent == K8S:
            for doc in docs:
                assert doc.get("apiVersion") and doc.get("kind"), f"{path}: not a Kubernetes object"
                if doc["kind"] != "Kustomization":
                    assert doc["metadata"]["name"].startswith(NAME), path


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_probes_point_at_health_endpoints_on_the_served_port() -> None:
    container = main_container()
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["HOST"] == "0.0.0.0"
    served = int(env["PORT"])
    assert served == int(env_of(dockerfile_stages()[-1])["PORT"])
    for probe in probes.values():
        assert container_port(container, probe["port"]) == served
    annotations = one("Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert int(annotations["prometheus.io/port"]) == served
    assert container["command"][:3] == ["python", "-m", "cds"]


def test_probe_paths_are_routes_of_the_app() -> None:
    from cds.api.app import create_app

    app = create_app(Settings(env="dev"))
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {"/healthz", "/readyz"} <= paths
    metrics_path = one("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    if metrics_path not in paths:
        pytest.skip(f"{metrics_path} is not wired into the app yet")


def test_containers_have_resource_requests_and_limits_and_no_privileges() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"] + spec.get("initContainers", []):
        resources = container["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[section]), (container["name"], section)
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["image"] == main_container()["image"]


def test_settings_come_from_the_configmap_and_the_secret() -> None:
    container = main_container()
    refs = {(k, v["name"]) for source in container["envFrom"] for k, v in source.items()}
    config_name = next(name for kind, name in refs if kind == "configMapRef")
    secret_name = next(name for kind, name in refs if kind == "secretRef")
    config = by_name("ConfigMap", config_name)["data"]
    secret = by_name("Secret", secret_name)
    secret_data = secret.get("stringData") or secret.get("data")
    assert {"CDS_TRUSTED_ISSUERS", "CDS_PSEUDONYM_KEY", "CDS_DATABASE_URL"} == set(secret_data)
    assert config["CDS_ENV"] == "prod"
    assert config["CDS_PUBLIC_BASE_URL"].startswith("https://")
    assert "CDS_ALLOWED_FHIR_SERVERS" in config
    known = settings_env_names()
    assert set(config) <= known and set(secret_data) <= known
    assert not {"CDS_TRUSTED_ISSUERS", "CDS_PSEUDONYM_KEY", "CDS_DATABASE_URL"} & set(config)  # secrets stay secret
    assert Settings(database_url=secret_data["CDS_DATABASE_URL"]).sqlalchemy_url.startswith("postgresql+asyncpg://")
    json.loads(secret_data["CDS_TRUSTED_ISSUERS"])  # valid JSON placeholder


def test_rule_overrides_configmap_becomes_the_knowledge_dir() -> None:
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    overrides = [v for v in volumes.values() if "configMap" in v]
    assert len(overrides) == 1
    by_name("ConfigMap", overrides[0]["configMap"]["name"])  # exists in the manifests
    init = spec["initContainers"][0]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert overrides[0]["name"] in init_mounts
    env = {e["name"]: e.get("value") for e in main_container()["env"]}
    knowledge = env["CDS_KNOWLEDGE_DIR"]
    main_mounts = {m["mountPath"]: m for m in main_container()["volumeMounts"]}
    assert main_mounts[knowledge]["name"] in volumes and main_mounts[knowledge].get("readOnly") is True
    assert init_mounts[main_mounts[knowledge]["name"]] == knowledge  # the init container fills the same volume
    for container in spec["containers"] + spec["initContainers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes


def test_service_hpa_and_pdb_target_the_deployment() -> None:
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()

    service = one("Service")
    assert service["spec"]["selector"] == selector
    (port,) = service["spec"]["ports"]
    assert container_port(main_container(), port["targetPort"]) == 8080

    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"], "the HPA needs a metric"

    pdb = one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    # a node drain must stay possible: the budget leaves at least one pod evictable at the minimum scale
    assert pdb["spec"]["minAvailable"] < min(hpa["spec"]["minReplicas"], deployment["spec"]["replicas"])
