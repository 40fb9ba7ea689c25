"""The Kubernetes manifests and the compose file in deploy/ (README, "Kubernetes and compose").

The manifests are checked offline against the API schemas that `kubernetes-validate`
ships, strictly (an unknown or misspelt field is an error, as `kubectl apply` with
server-side validation would say), for the newest version it knows and for 1.30, the
oldest the project supports. Then the properties a deployment relies on are asserted,
because a schema-valid manifest can still run as root or lose the shared spool.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from niftidrop.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VERSIONS = [kubernetes_validate.latest_version(), "1.30"]
MANIFESTS = ["deployment.yaml", "pvc.yaml"]
HEALTH = ["niftidrop", "health"]
IMAGE_UID = 10001  # the Dockerfile's USER


def _load(path: Path) -> dict[str, Any]:
    """One YAML document as a mapping; a manifest file holds exactly one."""
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert len(documents) == 1, f"{path.name}: expected one document"
    data = documents[0]
    assert isinstance(data, dict)
    return data


def _deployment() -> dict[str, Any]:
    return _load(KUBERNETES / "deployment.yaml")


def _container() -> dict[str, Any]:
    """The Deployment's only container, the service."""
    containers = _deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_strictly(name: str, version: str) -> None:
    """Each manifest passes the API schema of the version, unknown fields refused."""
    kubernetes_validate.validate(_load(KUBERNETES / name), version, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The offline check has teeth: a misspelt field in the pod spec is an error."""
    data = _deployment()
    broken = copy.deepcopy(data)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_both_manifests() -> None:
    """`kubectl apply -k deploy/kubernetes` applies the claim and the Deployment."""
    kustomization = _load(KUBERNETES / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    assert all((KUBERNETES / name).is_file() for name in kustomization["resources"])


def test_deployment_runs_two_replicas_of_the_image() -> None:
    deployment = _deployment()
    assert deployment["kind"] == "Deployment"
    assert deployment["spec"]["replicas"] == 2
    assert _container()["image"] == "niftidrop:latest"


def test_probes_run_niftidrop_health() -> None:
    """Liveness, readiness and startup are the image's HEALTHCHECK command."""
    container = _container()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["exec"]["command"] == HEALTH, probe


def test_container_runs_unprivileged_on_a_read_only_root() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_resources_cap_cpu_at_two() -> None:
    """A CPU limit (a cgroup quota) is what sizes `workers`; a request alone is not."""
    resources = _container()["resources"]
    assert resources["limits"]["cpu"] == "2"
    assert "memory" in resources["limits"]
    assert set(resources["requests"]) == {"cpu", "memory"}


def test_grace_period_outlasts_the_shutdown_timeout() -> None:
    grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["shutdown_timeout"].default


def test_prometheus_scrapes_the_metrics_port() -> None:
    """The annotations name the port the service listens on for /metrics."""
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    container = _container()
    assert "metrics_address" in Settings.model_fields
    address = _env(container)["NIFTIDROP_METRICS_ADDRESS"]
    host, port = address.rsplit(":", 1)
    assert host == "0.0.0.0"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == port
    assert [p["containerPort"] for p in container["ports"]] == [int(port)]


def test_environment_sets_the_lease_and_leaves_the_instance_name() -> None:
    """The pod name (its host name) is the instance name; no fixed name is shared."""
    env = _env(_container())
    assert float(env["NIFTIDROP_LEASE_TIMEOUT"]) > 0
    assert "NIFTIDROP_INSTANCE" not in env


def test_spool_is_the_read_write_many_claim_at_data() -> None:
    """Every replica mounts the one shared claim where the image keeps its spool."""
    claim = _load(KUBERNETES / "pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = _deployment()["spec"]["template"]["spec"]
    mounts = {mount["mountPath"]: mount["name"] for mount in _container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    spool = volumes[mounts["/data"]]
    assert spool["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_compose_runs_two_instances_on_one_volume() -> None:
    """Two services of the image, one spool bind at /data, distinct host names."""
    compose = _load(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert len(services) == 2
    hostnames = {service["hostname"] for service in services.values()}
    assert len(hostnames) == 2
    for service in services.values():
        assert service["image"] == "${NIFTIDROP_IMAGE:-niftidrop:latest}"
        assert service["volumes"] == ["${NIFTIDROP_SPOOL:-./spool}:/data"]
        assert service["healthcheck"]["test"] == ["CMD", *HEALTH]
        assert service["restart"] == "unless-stopped"
        lease = service["environment"]["NIFTIDROP_LEASE_TIMEOUT"]
        assert lease == "${NIFTIDROP_LEASE_TIMEOUT:-60}"  # deploy/ci.sh sets a shorter one
        assert "NIFTIDROP_INSTANCE" not in service["environment"]
