"""The test bed's node, as ``captchatask testbed up --node`` starts it: pods really run.

One node for the module (starting it takes a minute): it must become Ready, run a pod from an
image imported locally (no registry), give it an address on the bridge and its ServiceAccount
token, route a ClusterIP Service to another pod (by address and, through CoreDNS, by name), and
let the pod reach kube-apiserver in-cluster.
``down`` must then leave no process, mount, link, route or iptables rule behind.

A missing binary or package fails these tests with the command that provides it: a skipped node
test would hide exactly what it exists to catch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from captchatask import testbed
from captchatask.testbed.node import (
    BRIDGE,
    NODE_NAME,
    POD_CIDR,
    Node,
    leftovers,
    locate_node_toolchain,
)
from captchatask.testbed.oci import ImageFile, write_oci_archive

pytestmark = [pytest.mark.controlplane, pytest.mark.node, pytest.mark.slow]

#: The test workload (tests/testbed/nodeprobe), imported under a fully qualified name.
PROBE_IMAGE = "localhost/captchatask/nodeprobe:test"
PROBE_SOURCE = Path(__file__).parent / "nodeprobe"
#: Seconds a pod may take to run and report (image already imported, so no pulls).
POD_TIMEOUT = 120


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "captchatask.testbed", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


#: Machine-wide settings the node must put back as it found them.
HOST_SETTINGS = (
    Path("/proc/sys/net/ipv4/ip_forward"),
    Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"),
    Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"),
)


@pytest.fixture(scope="module")
def host_before() -> dict[Path, str]:
    """The machine-wide settings before the node starts."""
    return {path: path.read_text() for path in HOST_SETTINGS if path.exists()}


@pytest.fixture(scope="module")
def node_state_dir(
    host_before: dict[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Start ``testbed up --node``; always ``down`` afterwards (a no-op if a test did it)."""
    try:
        locate_node_toolchain(testbed.locate_toolchain().bin_dir)
    except testbed.MissingBinaryError as err:
        pytest.fail(str(err), pytrace=False)
    state_dir = tmp_path_factory.mktemp("node") / "testbed"
    up = _cli("up", "--node", "--state-dir", str(state_dir))
    try:
        assert up.returncode == 0, f"testbed up --node failed:\n{up.stderr}"
        yield state_dir
    finally:
        _cli("down", "--state-dir", str(state_dir))


@pytest.fixture(scope="module")
def plane(node_state_dir: Path) -> testbed.ControlPlane:
    plane = testbed.ControlPlane.attach(node_state_dir)
    assert plane is not None
    return plane


@pytest.fixture(scope="module")
def probe_image(plane: testbed.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the probe program and import it into the node's containerd as an OCI image."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is not installed: the node tests build their workload with Go")
    out = tmp_path_factory.mktemp("probe")
    subprocess.run(
        [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "nodeprobe"), "."],
        cwd=PROBE_SOURCE,
        env={**plane.env(), "CGO_ENABLED": "0"},
        check=True,
        timeout=600,
    )
    archive = write_oci_archive(
        out / "nodeprobe.tar",
        name=PROBE_IMAGE,
        files=[ImageFile("nodeprobe", (out / "nodeprobe").read_bytes(), 0o755)],
        entrypoint=["/nodeprobe"],
    )
    node = Node.attach(plane)
    assert node is not None
    node.import_image(archive)
    return PROBE_IMAGE


def _get(plane: testbed.ControlPlane, *args: str) -> dict[str, Any]:
    return dict(json.loads(plane.kubectl("get", *args, "-o", "json").stdout))


def _pod(name: str, image: str, args: list[str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "args": args,
                }
            ],
        },
    }


def _probe_report(plane: testbed.ControlPlane, namespace: str, pod: str) -> dict[str, str]:
    """Wait until the probe pod printed its apiserver line; return its lines as a dict."""
    deadline = time.monotonic() + POD_TIMEOUT
    logs = ""
    while time.monotonic() < deadline:
        result = plane.kubectl("logs", "-n", namespace, pod, check=False)
        logs = result.stdout
        if "apiserver:" in logs:
            return dict(line.split(": ", 1) for line in logs.splitlines() if ": " in line)
        time.sleep(1)
    status = plane.kubectl("get", "pod", "-n", namespace, pod, "-o", "yaml", check=False).stdout
    message = f"probe pod did not report within {POD_TIMEOUT}s; logs: {logs!r}\n{status}"
    raise AssertionError(message)


def test_the_node_registers_and_is_ready(plane: testbed.ControlPlane) -> None:
    node = _get(plane, "node", NODE_NAME)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    info = node["status"]["nodeInfo"]
    versions = testbed.pinned_versions()
    assert info["kubeletVersion"] == f"v{versions['KUBERNETES_VERSION']}"
    assert info["containerRuntimeVersion"].startswith("containerd://")


def test_a_pod_runs_with_a_bridge_ip_a_token_and_reaches_another_pod_through_a_service(
    plane: testbed.ControlPlane, probe_image: str
) -> None:
    namespace = "node-probe"
    plane.kubectl("create", "namespace", namespace)
    # The namespace's `default` ServiceAccount comes from kube-controller-manager.
    deadline = time.monotonic() + POD_TIMEOUT
    while plane.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode:
        assert time.monotonic() < deadline, "no default ServiceAccount: is the controller running?"
        time.sleep(0.5)
    server = _pod("server", probe_image, ["serve", ":8080"], {"app": "server"})
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    documents = [server, service]
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))
    plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "pod/server", f"--timeout={POD_TIMEOUT}s"
    )
    cluster_ip = _get(plane, "service", "server", "-n", namespace)["spec"]["clusterIP"]
    urls = [
        f"http://{cluster_ip}/",
        f"http://server.{namespace}.svc.cluster.local/",
        "http://server/",
    ]
    client = _pod("client", probe_image, ["probe", *urls], {"app": "client"})
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(client))

    report = _probe_report(plane, namespace, "client")

    prefix = POD_CIDR.rsplit(".", 1)[0] + "."
    assert report["pod-ip"].startswith(prefix), report
    assert _get(plane, "pod", "client", "-n", namespace)["status"]["podIP"] == report["pod-ip"]
    assert report["token"].endswith(" bytes"), report
    assert int(report["token"].split()[0]) > 0, report
    assert report["service-0"] == "hello from server", report  # by ClusterIP
    assert report["service-1"] == "hello from server", report  # by name, through CoreDNS
    assert report["service-2"] == "hello from server", report  # by the namespace's search path
    assert report["apiserver"] == "200", report


def test_down_leaves_nothing_behind(
    node_state_dir: Path, plane: testbed.ControlPlane, host_before: dict[Path, str]
) -> None:
    node = Node.attach(plane)
    assert node is not None
    pids = {**plane.pids, **node.pids}
    assert set(pids) >= {"etcd", "kube-apiserver", "containerd", "kubelet", "kube-proxy"}

    down = _cli("down", "--state-dir", str(node_state_dir))

    assert down.returncode == 0, down.stderr
    assert leftovers(node_state_dir) == []
    assert not Path("/sys/class/net", BRIDGE).exists()
    assert not node_state_dir.exists()
    assert {path: path.read_text() for path in host_before} == host_before
