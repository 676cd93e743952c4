"""deploy/kubernetes/citadel-llm.yaml: valid against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown or misspelt field fails), and consistent with the service: its settings
load, readiness is /health on the gateway's port, and the grace period covers preStop plus
serve's whole stop."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.supervisor import stop_budget_s
from shared.config import DEFAULT_CONFIG_FILE, load_config

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "citadel-llm.yaml"
KUBERNETES_VERSION = "1.30"  # the first with preStop's sleep action as GA


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_valid_against_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(documents()[kind], KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_caught() -> None:
    doc = documents()["Deployment"]
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_consistent_with_the_service() -> None:
    docs = documents()
    pod = docs["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = load_config(DEFAULT_CONFIG_FILE, environ={k: v for k, v in env.items() if k.startswith("PHI_3_MINI_")})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["metrics"]) == (config.port, config.metrics_port)
    assert config.host == config.metrics_host == "0.0.0.0"  # reachable from the Service
    # readiness on /health of the gateway's port; no liveness probe that would kill a loading pod
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "livenessProbe" not in container
    # the kubelet's SIGKILL comes after preStop's wait and serve's whole stop, at the largest
    # stop_timeout_s the configuration allows
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + stop_budget_s(20.0) >= \
        pre_stop_s + stop_budget_s(config.stop_timeout_s)
    # memory_gb is the memory limit, which the KV cache is sized to fit
    assert container["resources"]["limits"]["memory"] == f"{config.memory_gb:g}Gi"
    # the Service selects these pods, on the named ports
    assert docs["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} == set(ports)
