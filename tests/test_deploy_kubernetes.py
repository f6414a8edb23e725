"""deploy/kubernetes/ with kubernetes-validate, and the numbers that must agree.

- Every manifest validates, strictly (no field the API does not know), against the
  OpenAPI schemas of each Kubernetes version the docs claim (``VERSIONS``).
- The grace period covers the preStop pause and gunicorn's graceful timeout (the
  ConfigMap's, else the settings' default); the probes name the app's own routes, each
  for its purpose (liveness never on /readyz); the ports, the selectors, the metrics
  directory and the Prometheus job that finds the pods agree with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stageserver import create_app
from stageserver.settings import PROCESS_SETTINGS, SETTINGS
from testing.servers import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
#: The versions the docs claim: from 1.30, where the preStop `sleep` action is on by
#: default, to the newest kubernetes-validate knows.
VERSIONS = [f"1.{minor}.0" for minor in range(30, 38)]


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = [
        (path, document)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]
    assert found, MANIFESTS
    return found


def resource(kind: str, name: str = "stageserver") -> dict[str, Any]:
    [found] = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


DEPLOYMENT = resource("Deployment")
POD = DEPLOYMENT["spec"]["template"]
[CONTAINER] = POD["spec"]["containers"]
CONFIG = resource("ConfigMap")["data"]


def env(name: str) -> str:
    [value] = [e["value"] for e in CONTAINER["env"] if e["name"] == name]
    return str(value)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifests_validate_against_kubernetes(version: str) -> None:
    for path, document in documents():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            raise AssertionError(
                f"{path.name} against {version}: {where}: {error.message}"
            ) from None


def test_the_grace_period_covers_the_pause_and_the_graceful_timeout() -> None:
    """The kubelet counts the grace period from the start of preStop, and sends SIGTERM
    only after it: the pause and gunicorn's graceful timeout must both fit, with a
    margin for the arbiter's exit, or the SIGKILL cuts the handoff."""
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    pause = CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = int(
        CONFIG.get(
            "STAGESERVER_GRACEFUL_TIMEOUT", PROCESS_SETTINGS["STAGESERVER_GRACEFUL_TIMEOUT"][0]
        )
    )
    assert "STAGESERVER_GRACEFUL_TIMEOUT" in CONFIG  # said where the grace period is set
    assert grace >= pause + graceful + 5, (grace, pause, graceful)


def test_the_probes_name_the_apps_routes_each_for_its_purpose() -> None:
    """Readiness on /readyz (an upstream down, a shutdown: no new stages here); liveness
    and startup on /healthz, which answers while the event loop does. A liveness probe on
    /readyz would restart healthy pods whenever an upstream is down."""
    routes = {rule.rule: rule.endpoint for rule in create_app({}).url_map.iter_rules()}
    probes = {
        kind: CONTAINER[f"{kind}Probe"]["httpGet"]["path"]
        for kind in ("readiness", "liveness", "startup")
    }
    assert {kind: routes.get(path) for kind, path in probes.items()} == {
        "readiness": "stageserver_ops.readyz",
        "liveness": "stageserver_ops.healthz",
        "startup": "stageserver_ops.healthz",
    }
    # /readyz waits for each upstream up to STAGESERVER_READY_TIMEOUT: the probe waits longer.
    ready_timeout = float(SETTINGS["STAGESERVER_READY_TIMEOUT"][0])
    assert CONTAINER["readinessProbe"]["timeoutSeconds"] > ready_timeout


def test_the_ports_agree() -> None:
    [port] = CONTAINER["ports"]
    assert port["name"] == "http"
    assert env("STAGESERVER_BIND") == f"0.0.0.0:{port['containerPort']}"
    for probe in ("readiness", "liveness", "startup"):
        assert CONTAINER[f"{probe}Probe"]["httpGet"]["port"] == "http"
    [service_port] = resource("Service")["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    metrics = resource("Service", "stageserver-metrics")["spec"]
    assert metrics["clusterIP"] == "None" and metrics["publishNotReadyAddresses"] is True
    [metrics_port] = metrics["ports"]
    assert metrics_port["port"] == port["containerPort"]
    # Prometheus's job finds the pods through the headless Service's DNS name.
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-kubernetes.yml").read_text())
    [job] = scrape["scrape_configs"]
    [dns] = job["dns_sd_configs"]
    namespace = DEPLOYMENT["metadata"]["namespace"]
    assert dns["names"] == [f"stageserver-metrics.{namespace}.svc.cluster.local"]
    assert dns["port"] == port["containerPort"]


def test_the_selectors_find_the_pods() -> None:
    labels = POD["metadata"]["labels"]
    selectors = [
        DEPLOYMENT["spec"]["selector"]["matchLabels"],
        resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        resource("Service")["spec"]["selector"],
        resource("Service", "stageserver-metrics")["spec"]["selector"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    namespaces = {
        d["metadata"].get("namespace") for _, d in documents() if d["kind"] != "Namespace"
    }
    assert namespaces == {resource("Namespace")["metadata"]["name"]}


def test_the_metrics_directory_is_an_empty_dir_and_the_keys_a_secret() -> None:
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    metrics = volumes[mounts[env("PROMETHEUS_MULTIPROC_DIR")]]
    assert "emptyDir" in metrics
    keys = env("STAGESERVER_API_KEYS").removeprefix("@")
    directory, _, file_name = keys.rpartition("/")
    secret = volumes[mounts[directory]]["secret"]["secretName"]
    assert file_name in resource("Secret", secret)["stringData"]
    assert CONTAINER["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts  # gunicorn's worker heartbeat files, on a read-only root


def test_resources_and_workers_agree() -> None:
    """Requests and limits for both; one worker per requested CPU; several workers (and
    several pods) need the shared store, which gunicorn would otherwise refuse."""
    resources = CONTAINER["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind
    workers = int(CONFIG["STAGESERVER_WORKERS"])
    assert workers == int(resources["requests"]["cpu"])
    assert CONFIG["STAGESERVER_STORE_URL"].startswith("redis")
    rolling = DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0  # a pod is always there to take over handoffs
