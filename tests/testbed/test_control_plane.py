"""The session control plane is a real, ready kube-apiserver on loopback with the pinned version."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from captchatask import testbed


def test_readyz_answers_ok(kubectl: testbed.Kubectl) -> None:
    assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_the_server_reports_the_pinned_kubernetes_version(
    kubectl: testbed.Kubectl, repo_root: Path
) -> None:
    expected = "v" + testbed.pinned_versions(repo_root)["KUBERNETES_VERSION"]

    version = json.loads(kubectl("version", "--output=json").stdout)

    assert version["serverVersion"]["gitVersion"] == expected
    assert version["clientVersion"]["gitVersion"] == expected


def test_everything_listens_on_loopback(control_plane: testbed.ControlPlane) -> None:
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert control_plane.etcd_url.startswith("http://127.0.0.1:")
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == control_plane.server


def test_the_admin_kubeconfig_is_a_system_masters_client_certificate(
    kubectl: testbed.Kubectl,
) -> None:
    whoami = json.loads(kubectl("auth", "whoami", "--output=json").stdout)

    assert whoami["status"]["userInfo"]["username"] == "admin"
    assert "system:masters" in whoami["status"]["userInfo"]["groups"]


def test_kube_env_puts_the_pinned_kubectl_first_on_path(
    control_plane: testbed.ControlPlane, kube_env: dict[str, str]
) -> None:
    result = subprocess.run(
        ["kubectl", "get", "namespace", "default", "--output=name"],
        env=kube_env,
        capture_output=True,
        text=True,
        check=True,
    )

    assert kube_env["KUBECONFIG"] == str(control_plane.kubeconfig)
    assert result.stdout.strip() == "namespace/default"


def test_captchatask_crds_are_installed_and_established(kubectl: testbed.Kubectl) -> None:
    expected = {
        str(doc["metadata"]["name"])
        for doc in testbed.default_crd_documents()
        if doc.get("kind") == "CustomResourceDefinition"
    }

    crds = json.loads(kubectl("get", "customresourcedefinitions", "--output=json").stdout)

    established = {
        item["metadata"]["name"]
        for item in crds["items"]
        if any(
            c["type"] == "Established" and c["status"] == "True"
            for c in item["status"]["conditions"]
        )
    }
    assert expected <= established


def test_the_namespace_fixture_creates_a_fresh_namespace(
    kubectl: testbed.Kubectl, namespace: str
) -> None:
    assert namespace.startswith("ct-")
    phase = kubectl("get", "namespace", namespace, "--output=jsonpath={.status.phase}").stdout

    assert phase == "Active"
