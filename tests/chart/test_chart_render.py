"""The chart without a cluster: lint, schema, documented values, and what every render contains.

These follow the prometheus-community review checklist (house-style rule 11): labels and
immutable selectors, hardened pods, no default resources, optional objects off by default, the
component contract (flags, env, ports) and the Helm CRD caveat.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.chart.conftest import Helm, Render

from captchatask_sidecar.settings import load

CONTAINER_KINDS = {"Deployment"}
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def _deployment(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = [
        obj
        for obj in _by_kind(objects, "Deployment")
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_helm_lint_passes_with_the_defaults(helm: Helm, chart_dir: Path) -> None:
    result = helm("lint", str(chart_dir), "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_helm_lint_passes_with_every_ci_scenario(
    helm: Helm, chart_dir: Path, ci_values_files: list[Path]
) -> None:
    for values in ci_values_files:
        result = helm("lint", str(chart_dir), "--strict", "--values", str(values), check=False)
        assert result.returncode == 0, f"{values.name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.replicas=3", "additional properties 'replicas' not allowed"),
        ("defaultProvider.dialect=anticaptcha", "value must be one of"),
        ("operator.ha.replicas=1", "minimum"),
        ("receiver.service.port=0", "minimum"),
    ],
)
def test_the_schema_rejects_typos_and_bad_values(
    helm: Helm, chart_dir: Path, kube_version: str, setting: str, message: str
) -> None:
    result = helm(
        "template",
        "ct",
        str(chart_dir),
        "--kube-version",
        kube_version,
        "--set",
        setting,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["receiver.spool.persistence.enabled=true"], "needs receiver.replicas: 1"),
        (["pingbackKey.create=false"], "name your own Secret in existingSecret"),
        (
            [
                "receiver.spool.persistence.enabled=true",
                "receiver.spool.persistence.perReplica=true",
                "receiver.spool.persistence.existingClaim=mine",
            ],
            "cannot use existingClaim",
        ),
        (["receiver.spool.sizeLimit=lots"], "sizeLimit"),
    ],
)
def test_inconsistent_values_fail_with_an_explanation(
    helm: Helm, chart_dir: Path, kube_version: str, sets: list[str], message: str
) -> None:
    args = ["template", "ct", str(chart_dir), "--kube-version", kube_version]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def _leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        paths: list[str] = []
        for key, value in values.items():
            paths += _leaf_paths(value, f"{prefix}.{key}" if prefix else key)
        return paths
    return [prefix]


def _schema_has(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        properties = node.get("properties", {})
        if part not in properties:
            # A free-form object (securityContext, resources...) or a typed map (labels).
            extra = node.get("additionalProperties")
            return node.get("type") == "object" and (extra is None or isinstance(extra, dict))
        node = properties[part]
    return True


def test_every_value_is_typed_in_the_schema(chart_dir: Path) -> None:
    values = yaml.safe_load((chart_dir / "values.yaml").read_text(encoding="utf-8"))
    schema = json.loads((chart_dir / "values.schema.json").read_text(encoding="utf-8"))
    missing = [path for path in _leaf_paths(values) if not _schema_has(schema, path)]
    assert missing == []


def test_every_value_is_commented(chart_dir: Path) -> None:
    """Each key has a comment directly above it, or sits inside a commented block value."""
    lines = (chart_dir / "values.yaml").read_text(encoding="utf-8").splitlines()
    key_re = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):")
    documented_indents: list[int] = []  # indents of enclosing keys documented as a whole
    undocumented = []
    for number, line in enumerate(lines):
        match = key_re.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        documented_indents = [i for i in documented_indents if i < indent]
        previous = lines[number - 1].strip() if number else ""
        commented = previous.startswith("#")
        has_value = line.split(":", 1)[1].strip() != ""
        # Section headers (a key whose value is the following indented block) may rely on
        # their children's comments; leaves may not.
        if not commented and not documented_indents and has_value:
            undocumented.append(f"{number + 1}: {line.strip()}")
        if commented and previous.startswith("# --") and not has_value:
            documented_indents.append(indent)
    assert undocumented == []


def test_every_object_carries_the_standard_labels(
    render: Render, ci_values_files: list[Path]
) -> None:
    for values in ci_values_files:
        for obj in render(values):
            labels = obj["metadata"].get("labels", {})
            missing = [label for label in REQUIRED_LABELS if label not in labels]
            assert missing == [], f"{values.name}: {obj['kind']}/{obj['metadata']['name']}"


def test_selectors_never_include_the_chart_version(
    render: Render, ci_values_files: list[Path]
) -> None:
    for values in ci_values_files:
        for obj in render(values):
            selector = obj.get("spec", {}).get("selector", {})
            match_labels = selector.get("matchLabels", selector if obj["kind"] == "Service" else {})
            assert "helm.sh/chart" not in match_labels
            assert "app.kubernetes.io/version" not in match_labels


def test_pods_are_hardened_and_probed_on_the_admin_port(
    render: Render, ci_values_files: list[Path]
) -> None:
    for values in ci_values_files:
        for deployment in _by_kind(render(values), "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False
                assert security["readOnlyRootFilesystem"] is True
                assert security["capabilities"] == {"drop": ["ALL"]}
                ports = {port["name"]: port["containerPort"] for port in container["ports"]}
                assert ports["admin"] == 9090
                assert container["livenessProbe"]["httpGet"] == {
                    "path": "/healthz",
                    "port": "admin",
                }
                assert container["readinessProbe"]["httpGet"] == {
                    "path": "/readyz",
                    "port": "admin",
                }


def test_no_resources_are_set_by_default(render: Render) -> None:
    for deployment in _by_kind(render(), "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["resources"] == {}


def test_the_default_operator_is_one_standalone_replica_with_recreate(render: Render) -> None:
    objects = render()
    operator = _deployment(objects, "operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["operator", "--all-namespaces", "--standalone"]
    env = _env(container)
    assert env["CAPTCHATASK_PINGBACK_KEY_FILE"] == "/etc/captchatask/pingback-key/hmacKey"
    assert env["CAPTCHATASK_ADMIN_PORT"] == "9090"
    assert env["CAPTCHATASK_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert _by_kind(objects, "PodDisruptionBudget")[0]["metadata"]["name"].endswith("receiver")
    assert not _by_kind(objects, "ClusterKopfPeering")


def test_ha_runs_two_peered_replicas_with_a_peering_object_and_a_pdb(
    render: Render, chart_dir: Path
) -> None:
    objects = render(chart_dir / "ci" / "02-ha-values.yaml", include_crds=True)
    operator = _deployment(objects, "operator")
    assert operator["spec"]["replicas"] == 2
    assert operator["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["operator", "--all-namespaces", "--peering=captchatask-ci"]
    (peering,) = _by_kind(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "captchatask-ci"
    crd_names = {crd["metadata"]["name"] for crd in _by_kind(objects, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crd_names
    pdbs = {pdb["metadata"]["name"] for pdb in _by_kind(objects, "PodDisruptionBudget")}
    assert "ct-captchatask-operator" in pdbs


def test_the_peering_crds_are_installed_only_in_ha_mode(render: Render) -> None:
    crds = _by_kind(render(include_crds=True), "CustomResourceDefinition")
    assert {crd["spec"]["group"] for crd in crds} == {"captchatask.dev"}


def test_the_chart_peering_crds_match_the_operator_package(
    repo_root: Path, chart_dir: Path
) -> None:
    """The operator ships its own copy for non-Helm users; both must define the same API."""
    shipped = repo_root / "operator" / "captchatask_operator" / "peering-crd.yaml"
    assert shipped.is_file(), "the operator package ships kopf's peering CRDs"

    def shape(path: Path) -> dict[str, tuple[str, str, list[str]]]:
        return {
            doc["metadata"]["name"]: (
                doc["spec"]["scope"],
                doc["spec"]["names"]["kind"],
                [version["name"] for version in doc["spec"]["versions"]],
            )
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
            if doc
        }

    chart_copy = chart_dir / "charts" / "kopf-peering" / "crds" / "kopfpeerings.kopf.dev.yaml"
    assert shape(chart_copy) == shape(shipped)


def test_namespaced_mode_uses_roles_and_a_peering_object_per_namespace(
    render: Render, chart_dir: Path
) -> None:
    objects = render(chart_dir / "ci" / "03-namespaced-values.yaml")
    operator = _deployment(objects, "operator")
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "operator",
        "--namespace=ci-team-a",
        "--namespace=ci-team-b",
        "--peering=captchatask",
    ]
    roles = {
        (role["metadata"]["namespace"], role["metadata"]["name"])
        for role in _by_kind(objects, "Role")
    }
    for namespace in ("ci-team-a", "ci-team-b"):
        assert (namespace, "ct-captchatask-operator") in roles
        assert (namespace, "ct-captchatask-receiver") in roles
    peerings = {p["metadata"]["namespace"] for p in _by_kind(objects, "KopfPeering")}
    assert peerings == {"ci-team-a", "ci-team-b"}
    (cluster_role,) = [
        role
        for role in _by_kind(objects, "ClusterRole")
        if role["metadata"]["name"] == "ct-captchatask-operator"
    ]
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {"customresourcedefinitions", "namespaces"}
    receiver = _deployment(objects, "receiver")
    env = _env(receiver["spec"]["template"]["spec"]["containers"][0])
    assert env["CAPTCHATASK_PINGBACK_NAMESPACES"] == "ci-team-a,ci-team-b"


def test_the_receiver_serves_pingbacks_only_and_has_a_spool_volume(render: Render) -> None:
    objects = render()
    receiver = _deployment(objects, "receiver")
    pod = receiver["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["args"] == ["sidecar"]
    assert env["CAPTCHATASK_LOCAL_ADDR"] == ""
    assert env["CAPTCHATASK_PINGBACK_ADDR"] == "0.0.0.0:8080"
    assert env["CAPTCHATASK_SPOOL_DIR"] == "/var/spool/captchatask"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["spool"] == "/var/spool/captchatask"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["spool"]["emptyDir"] == {"sizeLimit": "256Mi"}
    service = next(
        svc
        for svc in _by_kind(objects, "Service")
        if svc["metadata"]["name"] == "ct-captchatask-receiver"
    )
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["pingback"]


def test_a_persistent_spool_uses_a_kept_claim_and_recreate(render: Render, chart_dir: Path) -> None:
    objects = render(chart_dir / "ci" / "04-receiver-persistent-values.yaml")
    (claim,) = _by_kind(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    receiver = _deployment(objects, "receiver")
    assert receiver["spec"]["strategy"] == {"type": "Recreate"}
    (ingress,) = _by_kind(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert [path["path"] for path in rule["http"]["paths"]] == ["/v1/pingback"]


def _receiver_env(objects: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    (receiver,) = [
        obj
        for obj in _by_kind(objects, kind)
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == "receiver"
    ]
    (container,) = receiver["spec"]["template"]["spec"]["containers"]
    return _env(container)


def test_the_spool_bound_stays_below_the_volume_the_kubelet_would_evict_at(
    render: Render, chart_dir: Path
) -> None:
    env = _receiver_env(render())
    assert env["CAPTCHATASK_SPOOL_MAX_BYTES"] == str(192 * 1024**2)  # 75 % of the 256Mi emptyDir
    assert env["CAPTCHATASK_SPOOL_MAX_RECORDS"] == "100000"
    assert env["CAPTCHATASK_SPOOL_READY_FRACTION"] == "0.8"
    bigger = _receiver_env(render(sets=["receiver.spool.sizeLimit=1.5Gi"]))
    assert bigger["CAPTCHATASK_SPOOL_MAX_BYTES"] == str(int(1.5 * 1024**3 * 3 // 4))
    claim = _receiver_env(render(chart_dir / "ci" / "04-receiver-persistent-values.yaml"))
    assert claim["CAPTCHATASK_SPOOL_MAX_BYTES"] == str(2 * 1024**3 * 3 // 4)  # of the 2Gi claim
    explicit = _receiver_env(render(sets=["receiver.spool.maxBytes=100Mi"]))
    assert explicit["CAPTCHATASK_SPOOL_MAX_BYTES"] == str(100 * 1024**2)


def test_the_receivers_ledger_pace_reaches_its_settings(render: Render) -> None:
    def settings(sets: list[str]) -> tuple[float, int]:
        env = _receiver_env(render(sets=sets))
        literal = {name: value for name, value in env.items() if isinstance(value, str)}
        loaded = load([], literal | {"CAPTCHATASK_PINGBACK_KEY_FILE": "k"})
        return loaded.ledger_writes_per_second, loaded.ledger_writes_burst

    assert settings([]) == (0.0, 10)  # no ceiling by default
    assert settings(["receiver.ledgerWritesPerSecond=50", "receiver.ledgerWritesBurst=5"]) == (
        50.0,
        5,
    )


def test_per_replica_spools_run_a_statefulset_with_one_kept_claim_per_replica(
    render: Render, chart_dir: Path
) -> None:
    objects = render(chart_dir / "ci" / "08-receiver-per-replica-values.yaml")
    assert not [
        obj
        for obj in _by_kind(objects, "Deployment")
        if obj["metadata"]["labels"]["app.kubernetes.io/component"] == "receiver"
    ]
    assert not _by_kind(objects, "PersistentVolumeClaim")  # the StatefulSet makes them
    (receiver,) = _by_kind(objects, "StatefulSet")
    spec = receiver["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == "ct-captchatask-receiver"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (template,) = spec["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "spool"
    assert template["spec"]["resources"]["requests"]["storage"] == "2Gi"
    # A claim template is immutable: nothing in it may change with the chart's version.
    assert "helm.sh/chart" not in template["metadata"]["labels"]
    assert "app.kubernetes.io/version" not in template["metadata"]["labels"]
    pod = spec["template"]["spec"]
    assert "spool" not in {volume["name"] for volume in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["spool"] == "/var/spool/captchatask"
    env = _env(container)
    assert env["CAPTCHATASK_SPOOL_MAX_BYTES"] == str(1536 * 1024**2)
    assert env["CAPTCHATASK_SPOOL_MAX_RECORDS"] == "200000"
    assert env["CAPTCHATASK_SPOOL_READY_FRACTION"] == "0.7"
    selector = spec["selector"]["matchLabels"].items()
    assert selector <= spec["template"]["metadata"]["labels"].items()


def test_monitoring_objects_are_off_by_default(render: Render) -> None:
    kinds = {obj["kind"] for obj in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "Ingress"}


def test_monitoring_objects_ship_the_canonical_files(render: Render, chart_dir: Path) -> None:
    objects = render(chart_dir / "ci" / "05-monitoring-values.yaml")
    (rule,) = _by_kind(objects, "PrometheusRule")
    canonical = yaml.safe_load((chart_dir / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == canonical
    (monitor,) = _by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["jobLabel"] == "captchatask.dev/job"
    maps = {cm["metadata"]["name"]: cm for cm in _by_kind(objects, "ConfigMap")}
    dashboards = maps["ct-captchatask-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboards["data"]["captchatask.json"])
    assert dashboard["uid"] == "captchatask-overview"
    alerts = yaml.safe_load(
        maps["ct-captchatask-grafana-alerts"]["data"]["captchatask-alerts.yaml"]
    )
    uids = {step["datasourceUid"] for rule in alerts["groups"][0]["rules"] for step in rule["data"]}
    assert uids == {"prom-main", "__expr__"}
    jobs = {
        svc["metadata"]["labels"].get("captchatask.dev/job") for svc in _by_kind(objects, "Service")
    }
    assert {"captchatask-operator", "captchatask-receiver"} <= jobs


def test_nothing_makes_the_api_server_dial_a_service(
    render: Render, ci_values_files: list[Path]
) -> None:
    """No Service-referenced webhooks or APIServices (they would dial a ClusterIP)."""
    forbidden = {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService"}
    for values in ci_values_files:
        assert not {obj["kind"] for obj in render(values, include_crds=True)} & forbidden


def test_the_pingback_key_is_identical_in_every_namespace_of_one_render(
    render: Render, chart_dir: Path
) -> None:
    objects = render(chart_dir / "ci" / "06-sidecar-provider-netpol-values.yaml")
    secrets = _by_kind(objects, "Secret")
    assert {secret["metadata"]["namespace"] for secret in secrets} == {"captchatask", "ci-shop"}
    assert len({secret["data"]["hmacKey"] for secret in secrets}) == 1
    for secret in secrets:
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_an_existing_secret_is_mounted_and_none_is_created(render: Render, chart_dir: Path) -> None:
    objects = render(chart_dir / "ci" / "07-existing-secret-values.yaml")
    assert not _by_kind(objects, "Secret")
    operator = _deployment(objects, "operator")
    volumes = {v["name"]: v for v in operator["spec"]["template"]["spec"]["volumes"]}
    assert volumes["pingback-key"]["secret"]["secretName"] == "my-pingback-key"


def test_the_default_provider_is_rendered_from_values(render: Render, chart_dir: Path) -> None:
    objects = render(chart_dir / "ci" / "06-sidecar-provider-netpol-values.yaml")
    (provider,) = _by_kind(objects, "CaptchaProvider")
    assert provider["metadata"]["name"] == "default"
    assert provider["spec"]["apiKeySecretRef"] == {"name": "captchaai-api-key", "key": "apiKey"}
    assert provider["spec"]["pingback"] == {"publicURL": "https://pingbacks.example.com"}
    assert provider["spec"]["polling"] == {"callbackTimeoutSeconds": 60, "intervalSeconds": 10}
    assert provider["spec"]["maxInFlight"] == 20


def test_rbac_is_grouped_under_framework_and_component_comments(chart_dir: Path) -> None:
    text = (chart_dir / "templates" / "_rbac.tpl").read_text(encoding="utf-8")
    assert "# Framework (kopf):" in text
    assert "# Operator:" in text
    assert "# Sidecar:" in text


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def _rules(role: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (resource, verb)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_user_roles_aggregate_into_view_edit_and_admin_like_cert_managers(render: Render) -> None:
    roles = {r["metadata"]["name"]: r for r in _by_kind(render(), "ClusterRole")}
    view, edit = roles["ct-captchatask-view"], roles["ct-captchatask-edit"]
    aggregates = {
        name: sorted(k.removeprefix(AGGREGATE) for k, v in r["metadata"]["labels"].items()
                     if k.startswith(AGGREGATE) and v == "true")
        for name, r in (("view", view), ("edit", edit))
    }  # fmt: skip
    # view's rules reach view, edit and admin; edit's reach edit and admin.
    assert aggregates == {"view": ["admin", "edit", "view"], "edit": ["admin", "edit"]}
    assert _rules(view) == {
        (resource, verb)
        for resource in ("captchatasks", "captchaproviders", "captchadeadletters")
        for verb in ("get", "list", "watch")
    }
    granted = _rules(edit)
    assert ("captchatasks", "create") in granted
    assert ("captchadeadletters/status", "patch") in granted  # dlq redrive
    assert ("captchadeadletters", "delete") in granted  # dlq purge
    # The ledger (task status) stays with the components; no one edits a result by hand.
    assert not any(resource == "captchatasks/status" for resource, _ in granted)
    assert not any(resource in ("secrets", "*") for resource, _ in granted | _rules(view))
    off = render(sets=["rbac.aggregateClusterRoles=false"])
    names = {r["metadata"]["name"] for r in _by_kind(off, "ClusterRole")}
    assert names == {"ct-captchatask-operator"}


def test_the_receiver_without_a_local_api_may_not_create_list_or_watch_tasks(
    render: Render,
) -> None:
    objects = render(
        sets=["sidecar.namespaces[0].namespace=apps", "sidecar.namespaces[0].serviceAccounts={web}"]
    )
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in _by_kind(objects, "Role")
    }
    receiver = _rules(roles[("captchatask", "ct-captchatask-receiver")])
    sidecar = _rules(roles[("apps", "ct-captchatask-sidecar")])
    assert {verb for resource, verb in receiver if resource == "captchatasks"} == {"get"}
    assert {verb for resource, verb in sidecar if resource == "captchatasks"} == {
        "get", "list", "watch", "create", "patch",
    }  # fmt: skip
    assert receiver - {("captchatasks", "get")} == sidecar - {
        ("captchatasks", verb) for verb in ("get", "list", "watch", "create", "patch")
    }


def _test_hook(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = [
        obj
        for obj in _by_kind(objects, "Pod")
        if obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    return pod


def test_helm_test_asks_the_services_with_a_chart_image_and_no_privilege(render: Render) -> None:
    pod = _test_hook(render())
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec  # no ServiceAccount of the release, no RBAC
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["image"].startswith("ghcr.io/captchatask/captchatask-sidecar:")
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    checks = json.loads(container["args"][1])
    assert [(what, url) for what, url, _, _ in checks] == [
        (
            "receiver pingback Service",
            "http://ct-captchatask-receiver.captchatask.svc:80/v1/pingback",
        ),
        ("receiver /readyz", "http://ct-captchatask-receiver-metrics.captchatask.svc:9090/readyz"),
        (
            "operator /metrics",
            "http://ct-captchatask-operator-metrics.captchatask.svc:9090/metrics",
        ),
    ]
    # Removed after it passes; a failed one stays for its log until the next `helm test`.
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == (
        "before-hook-creation,hook-succeeded"
    )


def test_helm_test_checks_only_what_the_network_policies_admit(render: Render) -> None:
    restricted = _test_hook(render(sets=["networkPolicy.enabled=true"]))
    checks = json.loads(restricted["spec"]["containers"][0]["args"][1])
    assert [what for what, *_ in checks] == ["receiver pingback Service"]
    closed = _test_hook(
        render(
            sets=[
                "networkPolicy.enabled=true",
                "networkPolicy.pingbackFrom[0].podSelector.matchLabels.app=ingress",
            ]
        )
    )
    assert json.loads(closed["spec"]["containers"][0]["args"][1]) == []


def test_the_operator_skips_routine_events_and_strips_managed_fields_by_default(
    render: Render,
) -> None:
    (container,) = _deployment(render(), "operator")["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert env["CAPTCHATASK_ROUTINE_EVENTS"] == "false"
    assert env["CAPTCHATASK_STRIP_MANAGED_FIELDS"] == "true"
    kept = _deployment(
        render(
            sets=["operator.writes.routineEvents=true", "operator.writes.stripManagedFields=false"]
        ),
        "operator",
    )
    env = _env(kept["spec"]["template"]["spec"]["containers"][0])
    assert env["CAPTCHATASK_ROUTINE_EVENTS"] == "true"
    assert env["CAPTCHATASK_STRIP_MANAGED_FIELDS"] == "false"


def test_api_priority_objects_are_off_by_default(render: Render) -> None:
    kinds = {obj["kind"] for obj in render()}
    assert "FlowSchema" not in kinds
    assert "PriorityLevelConfiguration" not in kinds


def test_api_priority_puts_both_service_accounts_in_their_own_priority_level(
    render: Render,
) -> None:
    objects = render(sets=["apiPriority.enabled=true"])
    (level,) = _by_kind(objects, "PriorityLevelConfiguration")
    (schema,) = _by_kind(objects, "FlowSchema")
    assert level["spec"]["type"] == "Limited"
    assert level["spec"]["limited"]["nominalConcurrencyShares"] == 1
    assert level["spec"]["limited"]["limitResponse"]["type"] == "Queue"
    assert schema["spec"]["priorityLevelConfiguration"]["name"] == level["metadata"]["name"]
    # Below kube's own service-accounts schema (9000), above the kube-system ones (900).
    assert 900 < schema["spec"]["matchingPrecedence"] < 9000
    subjects = [
        (s["serviceAccount"]["namespace"], s["serviceAccount"]["name"])
        for rule in schema["spec"]["rules"]
        for s in rule["subjects"]
    ]
    accounts = {
        (obj["metadata"]["namespace"], obj["metadata"]["name"])
        for obj in _by_kind(objects, "ServiceAccount")
    }
    assert set(subjects) == accounts
    assert len(accounts) == 2
    # kopf's peering keep-alives (kopf.dev) stay in Kubernetes' own levels: a storm of results
    # queued here must never delay a standby's view of the active replica.
    groups = {
        group
        for rule in schema["spec"]["rules"]
        for resource_rule in rule["resourceRules"]
        for group in resource_rule["apiGroups"]
    }
    assert groups == {"captchatask.dev", ""}


def test_api_priority_level_never_borrows_seats_beyond_its_own(render: Render) -> None:
    # APF shares out seats, not CPU: seats borrowed from idle levels during a storm would let
    # the components' writes keep the API server busy, which the level exists to prevent.
    (level,) = _by_kind(render(sets=["apiPriority.enabled=true"]), "PriorityLevelConfiguration")
    assert level["spec"]["limited"]["borrowingLimitPercent"] == 0
    (unbounded,) = _by_kind(
        render(sets=["apiPriority.enabled=true", "apiPriority.borrowingLimitPercent=null"]),
        "PriorityLevelConfiguration",
    )
    assert "borrowingLimitPercent" not in unbounded["spec"]["limited"]
