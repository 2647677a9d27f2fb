"""The chart against the real API server: dry-run every scenario, install it, prove its RBAC.

There are no controllers in the plain test bed: Deployments never get Pods, so installs run
without ``--wait`` and assert that every object exists. RBAC is proven with
``kubectl auth can-i --as=system:serviceaccount:<ns>:<sa>``: each component's allowed checks AND
the denied ones, so a grant that grows (or shrinks) fails a test.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.chart.conftest import Helm, Render, documents

from captchatask import testbed

#: RBAC bindings reach the authorizer through an informer, a few milliseconds after the write.
RBAC_PROPAGATION_SECONDS = 15.0
#: Parallel `kubectl auth can-i` calls (each is a short-lived process and one API request).
CAN_I_WORKERS = 8

# A check: (verb, resource, namespace or "-A" or "" for cluster-scoped, subresource or "").
Check = tuple[str, str, str, str]


def _ensure_namespace(kubectl: testbed.Kubectl, name: str) -> None:
    existing = kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name")
    if not existing.stdout.strip():
        kubectl("create", "namespace", name)


def _referenced_namespaces(objects: Sequence[dict[str, object]]) -> set[str]:
    found = set()
    for obj in objects:
        metadata = obj.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("namespace"), str):
            found.add(str(metadata["namespace"]))
    return found


@pytest.mark.usefixtures("support_crds")
def test_every_ci_scenario_passes_a_server_side_dry_run(
    render: Render, ci_values_files: list[Path], kubectl: testbed.Kubectl, namespace: str
) -> None:
    for values in ci_values_files:
        objects = render(values, namespace=namespace)
        for name in _referenced_namespaces(objects):
            _ensure_namespace(kubectl, name)
        manifest = yaml.safe_dump_all(objects)
        result = kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
        assert result.returncode == 0, f"{values.name}: {result.stderr}"
        applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len(objects), f"{values.name}: {result.stdout}"


@pytest.mark.usefixtures("support_crds")
def test_the_deploy_manifests_pass_a_server_side_dry_run(
    repo_root: Path, kubectl: testbed.Kubectl
) -> None:
    deploy = repo_root / "deploy"
    namespace = documents((deploy / "namespace.yaml").read_text(encoding="utf-8"))[0]
    _ensure_namespace(kubectl, namespace["metadata"]["name"])
    for name in ("crds", "rbac", "operator", "operator-ha", "receiver", "monitoring"):
        text = (deploy / f"{name}.yaml").read_text(encoding="utf-8")
        result = kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
        assert result.returncode == 0, f"deploy/{name}.yaml: {result.stderr}"


@dataclass(frozen=True)
class Release:
    """An installed release and the namespaces around it."""

    name: str
    namespace: str
    app_namespace: str
    other_namespace: str

    def service_account(self, component: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}-captchatask-{component}"


@pytest.fixture(scope="module")
def release(
    control_plane: testbed.ControlPlane,
    helm_binary: Path,
    chart_dir: Path,
    support_crds: None,
) -> Iterator[Release]:
    """One HA install with everything switched on, shared by the tests of this module."""
    suffix = secrets.token_hex(3)
    rel = Release(
        name=f"ct{suffix}",
        namespace=f"ct-chart-{suffix}",
        app_namespace=f"ct-chart-{suffix}-app",
        other_namespace=f"ct-chart-{suffix}-other",
    )
    for name in (rel.namespace, rel.app_namespace, rel.other_namespace):
        control_plane.kubectl("create", "namespace", name)
    argv = [
        str(helm_binary), "install", rel.name, str(chart_dir), "--namespace", rel.namespace,
        "--values", str(chart_dir / "ci" / "05-monitoring-values.yaml"),
        "--set", "operator.ha.enabled=true",
        "--set", f"operator.ha.peeringName={rel.name}",
        "--set", "operator.apiKeySecretNames={captchaai-api-key}",
        "--set", f"sidecar.namespaces[0].namespace={rel.app_namespace}",
        "--set", "sidecar.namespaces[0].serviceAccounts={web}",
        "--set", "defaultProvider.create=true",
        "--set", "receiver.ingress.enabled=true",
        "--set", "receiver.ingress.hosts={pingbacks.example.com}",
        "--set", "networkPolicy.enabled=true",
        "--set", "apiPriority.enabled=true",
    ]  # fmt: skip
    _helm(argv, control_plane)
    yield rel
    _helm([str(helm_binary), "uninstall", rel.name, "--namespace", rel.namespace], control_plane)
    for name in (rel.namespace, rel.app_namespace, rel.other_namespace):
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _helm(argv: list[str], plane: testbed.ControlPlane) -> str:
    import subprocess  # noqa: PLC0415 - only the module fixtures shell out to helm directly

    result = subprocess.run(
        argv, capture_output=True, text=True, env=plane.env(), timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_helm_install_creates_every_object(
    release: Release, cluster_helm: Helm, kubectl: testbed.Kubectl
) -> None:
    manifest = cluster_helm("get", "manifest", release.name, "-n", release.namespace).stdout
    objects = documents(manifest)
    kinds = {obj["kind"] for obj in objects}
    assert {
        "Deployment", "Service", "Ingress", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding", "Secret", "PodDisruptionBudget", "NetworkPolicy",
        "CaptchaProvider", "ClusterKopfPeering", "ServiceMonitor", "PrometheusRule", "ConfigMap",
    } <= kinds  # fmt: skip
    found = kubectl("get", "-f", "-", "-o", "name", input=manifest).stdout.split()
    assert len(found) == len(objects)
    # Deployments exist but never become ready: there is no controller-manager here.
    deployments = kubectl(
        "get", "deployments", "-n", release.namespace, "-o", "name"
    ).stdout.split()
    assert len(deployments) == 2


def _key(kubectl: testbed.Kubectl, namespace: str, name: str) -> str:
    data = kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data.hmacKey}").stdout
    return base64.b64decode(data).decode()


def test_the_pingback_key_is_generated_once_and_kept_on_upgrade(
    release: Release, cluster_helm: Helm, kubectl: testbed.Kubectl, chart_dir: Path
) -> None:
    secret = f"{release.name}-captchatask-pingback-key"
    before = _key(kubectl, release.namespace, secret)
    assert len(before) == 48
    assert before.isalnum()
    assert _key(kubectl, release.app_namespace, secret) == before
    cluster_helm("upgrade", release.name, str(chart_dir), "-n", release.namespace, "--reuse-values")
    assert _key(kubectl, release.namespace, secret) == before
    assert _key(kubectl, release.app_namespace, secret) == before


def test_the_documented_sidecar_snippet_is_a_valid_pod(
    release: Release, cluster_helm: Helm, kubectl: testbed.Kubectl
) -> None:
    notes = cluster_helm("get", "notes", release.name, "-n", release.namespace).stdout
    snippet = notes.split("\n---\n", 1)[1]
    (pod,) = documents(snippet)
    assert pod["metadata"]["namespace"] == release.app_namespace
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    result = kubectl("apply", "--dry-run=server", "-f", "-", input=snippet, check=False)
    assert result.returncode == 0, result.stderr
    # The Secret it mounts exists in the app's namespace.
    secret = pod["spec"]["volumes"][1]["secret"]["secretName"]
    kubectl("get", "secret", secret, "-n", release.app_namespace)


def _can_i(kubectl: testbed.Kubectl, user: str, check: Check) -> bool:
    verb, resource, namespace, subresource = check
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    if namespace == "-A":
        args.append("--all-namespaces")
    elif namespace:
        args += ["-n", namespace]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = kubectl(*args, check=False)
    return result.stdout.strip() == "yes"


def _assert_rbac(
    kubectl: testbed.Kubectl, user: str, *, allowed: list[Check], denied: list[Check]
) -> None:
    deadline = time.monotonic() + RBAC_PROPAGATION_SECONDS
    while not _can_i(kubectl, user, allowed[0]):
        assert time.monotonic() < deadline, f"{user}: the binding never took effect"
        time.sleep(0.1)
    checks = [(check, True) for check in allowed] + [(check, False) for check in denied]
    with ThreadPoolExecutor(CAN_I_WORKERS) as pool:
        answers = list(pool.map(lambda item: _can_i(kubectl, user, item[0]), checks))
    wrong = [
        f"{'expected yes' if expected else 'expected no'}: {check}"
        for (check, expected), answer in zip(checks, answers, strict=True)
        if answer != expected
    ]
    assert wrong == [], f"{user}:\n" + "\n".join(wrong)


CRDS = "customresourcedefinitions.apiextensions.k8s.io"
TASKS = "captchatasks.captchatask.dev"
PROVIDERS = "captchaproviders.captchatask.dev"
LETTERS = "captchadeadletters.captchatask.dev"


def test_the_operator_gets_exactly_what_it_needs_cluster_wide(
    release: Release, kubectl: testbed.Kubectl
) -> None:
    other = release.other_namespace
    allowed: list[Check] = [
        # Framework (kopf)
        ("list", CRDS, "", ""),
        ("watch", CRDS, "", ""),
        ("get", "clusterkopfpeerings.kopf.dev", "", ""),
        ("list", "clusterkopfpeerings.kopf.dev", "", ""),
        ("watch", "clusterkopfpeerings.kopf.dev", "", ""),
        ("patch", "clusterkopfpeerings.kopf.dev", "", ""),
        ("create", "events", other, ""),
        # Operator: the ledger, in every namespace
        ("list", TASKS, "-A", ""),
        ("watch", TASKS, "-A", ""),
        ("get", TASKS, other, ""),
        ("patch", TASKS, other, ""),
        ("delete", TASKS, other, ""),
        ("patch", TASKS, other, "status"),
        ("list", PROVIDERS, "-A", ""),
        ("watch", PROVIDERS, "-A", ""),
        ("patch", PROVIDERS, other, "status"),
        ("list", LETTERS, "-A", ""),
        ("create", LETTERS, other, ""),
        ("delete", LETTERS, other, ""),
        ("patch", LETTERS, other, "status"),
        ("patch", "events", other, ""),
        # Operator: the pinned API-key Secret, by name
        ("get", "secrets/captchaai-api-key", other, ""),
    ]
    denied: list[Check] = [
        ("get", "secrets/another-secret", other, ""),
        ("list", "secrets", other, ""),
        ("list", "secrets", "-A", ""),
        ("watch", "secrets", other, ""),
        ("create", "secrets", other, ""),
        ("delete", "secrets", other, ""),
        ("create", TASKS, other, ""),
        ("update", TASKS, other, ""),
        ("create", PROVIDERS, other, ""),
        ("delete", PROVIDERS, other, ""),
        ("get", "configmaps", other, ""),
        ("list", "pods", other, ""),
        ("create", "pods", other, ""),
        ("get", "deployments.apps", release.namespace, ""),
        ("list", "namespaces", "", ""),
        ("patch", "kopfpeerings.kopf.dev", other, ""),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", ""),
        ("create", CRDS, "", ""),
    ]
    _assert_rbac(kubectl, release.service_account("operator"), allowed=allowed, denied=denied)


def _local_api_checks(namespace: str) -> list[Check]:
    """What only the local task API needs: create, adopt (label) and watch tasks."""
    return [
        ("list", TASKS, namespace, ""),
        ("watch", TASKS, namespace, ""),
        ("create", TASKS, namespace, ""),
        ("patch", TASKS, namespace, ""),
    ]


def _sidecar_checks(namespace: str, *, local_api: bool = True) -> list[Check]:
    return [
        ("get", TASKS, namespace, ""),
        *(_local_api_checks(namespace) if local_api else []),
        ("patch", TASKS, namespace, "status"),
        ("get", PROVIDERS, namespace, ""),
        ("create", LETTERS, namespace, ""),
        ("create", "events", namespace, ""),
        ("patch", "events", namespace, ""),
    ]


def _sidecar_denied(namespace: str, elsewhere: str) -> list[Check]:
    return [
        ("get", "secrets", namespace, ""),
        ("list", "secrets", namespace, ""),
        ("delete", TASKS, namespace, ""),
        ("update", TASKS, namespace, ""),
        ("update", TASKS, namespace, "status"),
        ("list", PROVIDERS, namespace, ""),
        ("patch", PROVIDERS, namespace, ""),
        ("patch", PROVIDERS, namespace, "status"),
        ("get", LETTERS, namespace, ""),
        ("patch", LETTERS, namespace, ""),
        ("delete", LETTERS, namespace, ""),
        ("get", "configmaps", namespace, ""),
        ("create", "pods", namespace, ""),
        ("list", TASKS, "-A", ""),
        ("get", TASKS, elsewhere, ""),
        ("patch", TASKS, elsewhere, "status"),
        ("create", LETTERS, elsewhere, ""),
        ("list", CRDS, "", ""),
    ]


def test_the_receiver_may_record_results_in_its_namespace_and_nothing_more(
    release: Release, kubectl: testbed.Kubectl
) -> None:
    # The standalone receiver runs without the local task API, so it may not create, list or
    # watch tasks.
    _assert_rbac(
        kubectl,
        release.service_account("receiver"),
        allowed=_sidecar_checks(release.namespace, local_api=False),
        denied=[
            *_sidecar_denied(release.namespace, release.other_namespace),
            *_local_api_checks(release.namespace),
        ],
    )


def test_an_apps_sidecar_may_record_results_in_its_namespace_and_nothing_more(
    release: Release, kubectl: testbed.Kubectl
) -> None:
    web = f"system:serviceaccount:{release.app_namespace}:web"
    _assert_rbac(
        kubectl,
        web,
        allowed=_sidecar_checks(release.app_namespace),
        denied=_sidecar_denied(release.app_namespace, release.namespace),
    )
    # A ServiceAccount that was not listed gets nothing.
    stranger = f"system:serviceaccount:{release.app_namespace}:stranger"
    assert not _can_i(kubectl, stranger, ("get", TASKS, release.app_namespace, ""))


def test_a_namespaced_operator_is_confined_to_its_namespaces(
    control_plane: testbed.ControlPlane,
    helm_binary: Path,
    chart_dir: Path,
    kubectl: testbed.Kubectl,
    support_crds: None,
) -> None:
    suffix = secrets.token_hex(3)
    name, home, served, other = (
        f"ns{suffix}",
        f"ct-ns-{suffix}",
        f"ct-ns-{suffix}-a",
        f"ct-ns-{suffix}-b",
    )
    for namespace in (home, served, other):
        kubectl("create", "namespace", namespace)
    _helm(
        [
            str(helm_binary), "install", name, str(chart_dir), "--namespace", home,
            "--set", "operator.watch.allNamespaces=false",
            "--set", f"operator.watch.namespaces={{{served}}}",
            "--set", "operator.ha.enabled=true",
            "--set", f"operator.ha.peeringName={name}",
            "--set", "receiver.enabled=false",
        ],
        control_plane,
    )  # fmt: skip
    user = f"system:serviceaccount:{home}:{name}-captchatask-operator"
    _assert_rbac(
        kubectl,
        user,
        allowed=[
            ("list", TASKS, served, ""),
            ("patch", TASKS, served, "status"),
            ("get", "secrets", served, ""),
            ("patch", "kopfpeerings.kopf.dev", served, ""),
            ("list", "namespaces", "", ""),
            ("list", CRDS, "", ""),
        ],
        denied=[
            ("list", TASKS, other, ""),
            ("list", TASKS, home, ""),
            ("list", TASKS, "-A", ""),
            ("get", "secrets", other, ""),
            ("list", "secrets", served, ""),
            ("patch", "clusterkopfpeerings.kopf.dev", "", ""),
            ("patch", "kopfpeerings.kopf.dev", other, ""),
        ],
    )
    kubectl("get", "kopfpeering", name, "-n", served)
    _helm([str(helm_binary), "uninstall", name, "--namespace", home], control_plane)
    # The pingback key outlives the release (resource-policy keep): URLs in flight stay valid.
    kubectl("get", "secret", f"{name}-captchatask-pingback-key", "-n", home)
    for namespace in (home, served, other):
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# -- RBAC for people: the aggregated view/edit ClusterRoles -----------------------------------

AGGREGATED = ("view", "edit", "admin")


def _cluster_role(kubectl: testbed.Kubectl, name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(kubectl("get", "clusterrole", name, "-o", "json").stdout)
    return body


def test_the_standard_roles_aggregation_selectors_pick_our_user_roles(
    release: Release, kubectl: testbed.Kubectl
) -> None:
    """The API server's own bootstrap view/edit/admin select our roles by their labels.

    There is no kube-controller-manager here, so nothing copies the rules into view/edit/admin
    (its clusterrole-aggregation controller does that in a real cluster). This test does the
    controller's selection with the real objects instead: each standard role's
    aggregationRule selectors, evaluated by the API server (``kubectl get -l``), must pick
    exactly the roles a holder of that standard role should inherit.
    """
    ours = {f"{release.name}-captchatask-{suffix}" for suffix in ("view", "edit")}
    expected = {
        "view": {f"{release.name}-captchatask-view"},
        "edit": ours,
        "admin": ours,
    }
    for standard in AGGREGATED:
        rule = _cluster_role(kubectl, standard)["aggregationRule"]
        picked: set[str] = set()
        for selector in rule["clusterRoleSelectors"]:
            labels = ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
            names = kubectl("get", "clusterroles", "-l", labels, "-o", "name").stdout.split()
            picked |= {
                name.removeprefix("clusterrole.rbac.authorization.k8s.io/") for name in names
            }
        assert (
            picked & {n for n in picked if n.startswith(f"{release.name}-")} == expected[standard]
        )


def _bind(kubectl: testbed.Kubectl, namespace: str, user: str, cluster_roles: list[str]) -> None:
    for role in cluster_roles:
        kubectl(
            "create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
            f"--user={user}", "-n", namespace,
        )  # fmt: skip


def test_people_with_view_read_and_with_edit_create_tasks_and_redrive_letters(
    release: Release, kubectl: testbed.Kubectl
) -> None:
    """can-i for users holding what aggregation gives the standard view and edit roles.

    Bound explicitly to our ClusterRoles (no aggregation controller here, see above): a
    ``view`` holder gets the -view role, an ``edit`` holder both (-view carries the
    aggregate-to-edit label too).
    """
    namespace = release.other_namespace
    view_role = f"{release.name}-captchatask-view"
    edit_role = f"{release.name}-captchatask-edit"
    viewer, editor = f"viewer-{release.name}", f"editor-{release.name}"
    _bind(kubectl, namespace, viewer, [view_role])
    _bind(kubectl, namespace, editor, [view_role, edit_role])
    reads: list[Check] = [
        (verb, resource, namespace, "")
        for resource in (TASKS, PROVIDERS, LETTERS)
        for verb in ("get", "list", "watch")
    ]
    writes: list[Check] = [
        ("create", TASKS, namespace, ""),
        ("delete", TASKS, namespace, ""),
        ("create", PROVIDERS, namespace, ""),
        ("patch", LETTERS, namespace, "status"),
        ("delete", LETTERS, namespace, ""),
    ]
    never: list[Check] = [
        ("patch", TASKS, namespace, "status"),
        ("create", LETTERS, namespace, ""),
        ("get", "secrets", namespace, ""),
        ("list", TASKS, release.namespace, ""),
        ("list", TASKS, "-A", ""),
    ]
    _assert_rbac(kubectl, viewer, allowed=reads, denied=[*writes, *never])
    _assert_rbac(kubectl, editor, allowed=[*reads, *writes], denied=never)


def test_the_plugin_command_notes_print_runs_as_printed(
    release: Release,
    cluster_helm: Helm,
    control_plane: testbed.ControlPlane,
) -> None:
    """NOTES.txt tells people to run ``kubectl captchatask dlq list -n <ns>``: it must work."""
    import os  # noqa: PLC0415 - only this test puts the plugin on PATH
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    notes = cluster_helm("get", "notes", release.name, "-n", release.namespace).stdout
    commands = [
        line.split(": ", 1)[-1].strip()
        for line in notes.splitlines()
        if "kubectl captchatask" in line
    ]
    assert commands == [f"kubectl captchatask dlq list -n {release.namespace}"]
    env = control_plane.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in commands:
        argv = command.split()
        argv[0] = str(control_plane.toolchain.kubectl)
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert result.stdout == f"No dead letters in namespace {release.namespace}.\n"


def _flow_schema_of(
    kubectl: testbed.Kubectl, kubeconfig: Path, *args: str
) -> tuple[str | None, str | None]:
    """(FlowSchema uid, PriorityLevel uid) the API server classified one request into."""
    result = kubectl(f"--kubeconfig={kubeconfig}", *args, "-v=8", check=False)
    headers = {}
    for line in result.stderr.splitlines():
        if "X-Kubernetes-Pf-" in line:
            name, _, value = line.split("X-Kubernetes-Pf-", 1)[1].partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers.get("flowschema-uid"), headers.get("prioritylevel-uid")


def test_api_priority_objects_are_accepted_and_match_the_components_requests(
    release: Release, kubectl: testbed.Kubectl, control_plane: testbed.ControlPlane
) -> None:
    name = f"{release.name}-captchatask-components"
    schema = json.loads(kubectl("get", "flowschema", name, "-o", "json").stdout)
    level = json.loads(kubectl("get", "prioritylevelconfiguration", name, "-o", "json").stdout)
    # The API server took both and found the level the schema names.
    dangling = [c for c in schema["status"]["conditions"] if c["type"] == "Dangling"]
    assert [c["status"] for c in dangling] == ["False"]
    ours = (schema["metadata"]["uid"], level["metadata"]["uid"])
    for component in ("operator", "receiver"):
        config = control_plane.service_account_kubeconfig(
            release.namespace, f"{release.name}-captchatask-{component}"
        )
        tasks = ("get", "captchatasks", "-n", release.namespace)
        assert _flow_schema_of(kubectl, config, *tasks) == ours, component
        # Anything else the component asks (here: pods) keeps Kubernetes' own priority.
        pods = ("get", "pods", "-n", release.namespace)
        assert _flow_schema_of(kubectl, config, *pods)[0] not in (None, ours[0])
    # Another ServiceAccount's task requests are not ours either.
    other = control_plane.service_account_kubeconfig(release.other_namespace, "someone")
    assert _flow_schema_of(kubectl, other, "get", "captchatasks", "-n", release.namespace)[
        0
    ] not in (
        None,
        ours[0],
    )


@pytest.mark.usefixtures("support_crds")
def test_the_next_steps_notes_print_after_a_default_install_run_as_printed(
    control_plane: testbed.ControlPlane, helm_binary: Path, chart_dir: Path, repo_root: Path
) -> None:
    """A default install's NOTES say how to add the solver account: run those lines as printed.

    From the checkout, where every install command of the docs runs: the ``helm upgrade`` line
    must name a chart this user has (no chart repository is ever added), and afterwards the
    provider it promises exists.
    """
    import shlex  # noqa: PLC0415 - only this test runs NOTES lines
    import subprocess  # noqa: PLC0415

    suffix = secrets.token_hex(3)
    name, namespace = f"ctnotes{suffix}", f"ct-notes-{suffix}"
    install = [str(helm_binary), "install", name, str(chart_dir), "-n", namespace]
    notes = _helm([*install, "--create-namespace"], control_plane)
    try:
        step = notes.split("1. Store your solver API key", 1)[1].split("2. ", 1)[0]
        lines = [line.strip() for line in step.splitlines()[1:] if line.strip()]
        assert [line.split()[:2] for line in lines] == [["kubectl", "-n"], ["helm", "upgrade"]]
        tools = {"kubectl": str(control_plane.toolchain.kubectl), "helm": str(helm_binary)}
        for line in lines:
            argv = shlex.split(line)
            result = subprocess.run(
                [tools[argv[0]], *argv[1:]],
                capture_output=True,
                text=True,
                env=control_plane.env(),
                cwd=repo_root,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, f"{line}:\n{result.stderr}"
        provider = control_plane.kubectl("-n", namespace, "get", "captchaprovider", "-o", "name")
        assert provider.stdout.split() == ["captchaprovider.captchatask.dev/default"]
    finally:
        _helm([str(helm_binary), "uninstall", name, "-n", namespace], control_plane)
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
