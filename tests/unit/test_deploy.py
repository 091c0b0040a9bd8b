"""deploy/ as a platform engineer uses it, checked offline: the Helm chart rendered with Helm's
own engine, the compose files as Docker Compose resolves them, the Dockerfile, the dashboard.

Each wiring claim is checked against Modelium itself: every MODELIUM_* variable and the rendered
modelium.yaml must load as Settings, so a key that does not exist fails here, not in a pod."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelium.config import ConfigError, Settings, load_settings
from scripts.render_chart import objects
from tests.helpers import COMPOSE_VARIANTS, DEPLOY, compose, dashboard_metrics

VALUES = {
    "default": {},
    "nvidia": yaml.safe_load((DEPLOY / "helm" / "values-gpu.yaml").read_text()),
    "hostpath": yaml.safe_load((DEPLOY / "helm" / "values-hostpath.yaml").read_text()),
}
MODELIUM_SERVICES = ("modelium-control", "modelium-node", "modelium-gateway", "modelium-watcher")


def _workloads(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects(values) if o["kind"] in ("Deployment", "DaemonSet")}


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _settings_from_env(env: dict[str, str]) -> Settings:
    """What Modelium makes of a container's environment."""
    return load_settings(None, environ={k: v for k, v in env.items() if k.startswith("MODELIUM_")})


@pytest.mark.parametrize("name", sorted(VALUES))
def test_chart_probes_users_and_config(name: str, tmp_path: Path) -> None:
    values = VALUES[name]
    workloads = _workloads(values)
    assert {w.split("-", 1)[1] for w in workloads} == {"control", "gateway", "node", "watcher"}
    for workload in workloads.values():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in _containers(workload):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["readinessProbe"]["httpGet"]["path"] == "/ready", workload["metadata"]["name"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/health"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert container["readinessProbe"]["httpGet"]["port"] in ports
            env = {e["name"]: e for e in container["env"]}
            assert env["MODELIUM_CONFIG"]["value"] == "/etc/modelium/modelium.yaml"
    # The ConfigMap's modelium.yaml is a valid configuration (its TLS files are the Secret's
    # mount; here they are stand-ins with the same names).
    config = next(o for o in objects(values) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))
    text = config["data"]["modelium.yaml"]
    mount = tmp_path / "temporal-tls"
    mount.mkdir()
    for file in ("ca.crt", "tls.crt", "tls.key"):
        (mount / file).write_text("stand-in")
    rendered = tmp_path / "modelium.yaml"
    rendered.write_text(text.replace("/etc/modelium/temporal-tls", str(mount)))
    settings = load_settings(rendered, environ={})
    assert settings.temporal.address == (
        values.get("temporal", {}).get("address") or "temporal-frontend.temporal.svc.cluster.local:7233"
    )
    assert settings.watch_directories == [Path("/models")] and settings.metrics.port == 9090
    assert settings.temporal.uses_tls == bool(values.get("temporal", {}).get("tls", {}).get("enabled"))
    if values.get("apiKeys"):
        secret = next(o for o in objects(values) if o["kind"] == "Secret")
        keys = json.loads(secret["stringData"]["api-keys.json"])
        env = {"MODELIUM_GATEWAY__API_KEYS": json.dumps(keys), "MODELIUM_TEMPORAL__ADDRESS": "t:7233"}
        assert load_settings(None, environ=env).gateway.api_keys[0].organization == keys[0]["organization"]


def test_gpu_node_agents_ask_for_gpus_and_take_the_node_name() -> None:
    node = _workloads(VALUES["nvidia"])["modelium-node"]
    assert node["kind"] == "DaemonSet"
    pod = node["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = _containers(node)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e for e in container["env"]}
    assert env["MODELIUM_NODE__ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Gateways in other pods reach the runtimes at the pod's IP.
    assert env["MODELIUM_NODE__RUNTIME_HOST"]["value"] == "0.0.0.0"
    assert env["MODELIUM_NODE__ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    (policy,) = [o for o in objects({}) if o["kind"] == "NetworkPolicy"]
    allowed = [
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policy["spec"]["ingress"][0]["from"]
    ]
    assert sorted(allowed) == ["gateway", "node"] and policy["spec"]["ingress"][1] == {"ports": [{"port": "metrics"}]}
    with pytest.raises(ConfigError, match="set node.advertise_host"):
        load_settings(None, environ={"MODELIUM_NODE__RUNTIME_HOST": "0.0.0.0"})
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts
    # The default values are for a cluster without GPUs: no GPU limit, no runtime class.
    default = _workloads({})["modelium-node"]
    assert "runtimeClassName" not in default["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in _containers(default)[0]["resources"]["limits"]
    # A Kubernetes node name (a DNS name with dots) is a valid node id.
    assert load_settings(None, environ={"MODELIUM_NODE__ID": "gpu-1.us-east-2.compute.internal"}).node.id


def test_chart_models_volume_follows_the_storage_choice() -> None:
    def models_volume(values: dict[str, Any], workload: str) -> dict[str, Any]:
        volumes = _workloads(values)[workload]["spec"]["template"]["spec"]["volumes"]
        return next(v for v in volumes if v["name"] == "models")

    shared = models_volume({}, "modelium-node")
    assert (
        shared["persistentVolumeClaim"]["claimName"]
        == models_volume({}, "modelium-watcher")["persistentVolumeClaim"]["claimName"]
    )
    pvc = next(o for o in objects({}) if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    local = models_volume(VALUES["hostpath"], "modelium-node")
    assert local["hostPath"]["path"] == "/data/models"
    assert not [o for o in objects(VALUES["hostpath"]) if o["kind"] == "PersistentVolumeClaim"]
    watcher = _workloads(VALUES["hostpath"])["modelium-watcher"]
    assert watcher["spec"]["replicas"] == 1 and watcher["spec"]["strategy"]["type"] == "Recreate"
    dashboards = [o for o in objects({}) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards[0]["data"]["modelium.json"]) == json.loads(
        (DEPLOY / "grafana/modelium.json").read_text()
    )


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_services_and_their_wiring(variant: str) -> None:
    project = compose(variant)
    services = project["services"]
    for name in MODELIUM_SERVICES:
        service = services[name]
        settings = _settings_from_env(service["environment"])
        assert settings.temporal.address == "temporal:7233"
        assert settings.watch_directories == [Path("/models")] and settings.metrics.host == "0.0.0.0"
        assert service["healthcheck"]["test"][-1].endswith("/ready', timeout=4)")
        assert service["depends_on"]["temporal-namespace"]["condition"] == "service_completed_successfully"
    assert services["modelium-gateway"]["command"] == ["gateway"]
    assert services["modelium-control"]["command"] == ["worker", "control"]
    assert services["modelium-node"]["command"] == ["worker", "node"]
    assert services["modelium-watcher"]["command"] == ["watch"]
    mounts = {v["target"]: v for v in services["modelium-node"]["volumes"]}
    assert mounts["/models"]["read_only"] is True and "/var/lib/modelium" in mounts
    reservations = (services["modelium-node"].get("deploy") or {}).get("resources", {}).get("reservations", {})
    if variant == "cpu":
        assert not reservations and services["modelium-node"]["image"] == "modelium:cpu"
    else:
        assert reservations["devices"][0]["driver"] == "nvidia"
    if variant == "dev":
        assert "postgresql" not in services and services["temporal"]["command"][:2] == ["server", "start-dev"]
    else:
        # samples-server's order: Postgres healthy -> schema job done -> server healthy -> namespace job, UI.
        assert services["temporal-schema"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
        assert services["temporal"]["depends_on"]["temporal-schema"]["condition"] == "service_completed_successfully"
        assert services["temporal-namespace"]["depends_on"]["temporal"]["condition"] == "service_healthy"
        assert services["temporal-ui"]["depends_on"]["temporal"]["condition"] == "service_healthy"
        assert services["postgresql"]["image"].startswith("postgres:16")
    assert {"prometheus", "grafana"} <= set(services)


def test_images_run_as_a_user_and_versions_are_pinned() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    finals = [s for s in stages if re.match(r"\S+ AS (cpu|cuda)\b", s)]
    assert len(finals) == 2
    for stage in finals:
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users and users[-1] not in ("root", "0"), stage.splitlines()[0]
        assert "HEALTHCHECK" in stage and 'ENTRYPOINT ["modelium"]' in stage
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / "compose" / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in (
        "POSTGRESQL_VERSION",
        "TEMPORAL_VERSION",
        "TEMPORAL_ADMINTOOLS_VERSION",
        "TEMPORAL_UI_VERSION",
        "PROMETHEUS_VERSION",
        "GRAFANA_VERSION",
    ):
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?", env[key]), key
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:9090" for name in MODELIUM_SERVICES}


DASHBOARD_PANELS = (
    "Models by phase",
    "Requests/s per model and status",
    "Latency p50 / p95 / p99",
    "Cold-start waits (p95 per model)",
    "Requests waiting for a load",
    "Loads per minute",
    "Unloads by reason per minute",
    "Evictions per minute",
    "Device memory per node: total, booked, used",
    "Memory per model: estimated, measured, peak",
    "Brain decisions by runtime and source (last hour)",
    "Temporal reachable",
)


def test_dashboard_has_every_panel_asked_for() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "modelium.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert set(DASHBOARD_PANELS) <= titles
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    assert len(dashboard_metrics()) >= 12
