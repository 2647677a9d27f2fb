"""A one-node cluster on this machine: containerd, kubelet, controller-manager, scheduler, proxy.

The control plane alone (:mod:`captchatask.testbed.plane`) never runs a pod. This module adds a
real node next to it, every part a plain process of this machine, because there is no Docker
engine to run kind and no registry to pull from:

* the network: a bridge of our own (:data:`BRIDGE`) whose gateway address kube-apiserver listens
  on, ``unreachable`` routes for the pod and Service ranges (tagged with :data:`ROUTE_PROTO`) so
  a packet no rule handles dies here instead of leaving by the default route, and one
  ``FORWARD`` rule (commented :data:`IPTABLES_COMMENT`) that keeps pod traffic off every other
  interface;
* containerd with its own configuration, root, state and socket under the state directory (never
  the system service), using runc and the CNI ``bridge``/``host-local`` plugins;
* a pause image written here (:mod:`captchatask.testbed.oci`) and imported under the fully
  qualified name containerd's ``sandbox_image`` names;
* kubelet (cgroup v1 allowed, ``cgroupfs`` driver), kube-controller-manager (with the
  ServiceAccount token signer and root CA, so tokens are mounted), kube-scheduler and
  kube-proxy in iptables mode.

Each way this was found to fail on the build machines is written next to the setting that
avoids it. :meth:`Node.stop` removes every process, mount, network namespace, link, route and
iptables rule the node made; :func:`leftovers` lists any that remain, for tests and ``down``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from captchatask.testbed.errors import ControlPlaneError, MissingBinaryError
from captchatask.testbed.oci import ImageFile, write_oci_archive
from captchatask.testbed.plane import (
    KUBECONFIG_CONTEXT,
    SERVICE_CLUSTER_IP_RANGE,
    ControlPlane,
    Progress,
)
from captchatask.testbed.processes import POLL_INTERVAL, ManagedProcess, pid_alive
from captchatask.testbed.toolchain import LOOPBACK, TESTBIN_ENV, free_ports

__all__ = [
    "BRIDGE",
    "GATEWAY",
    "NODE_NAME",
    "PAUSE_IMAGE",
    "POD_CIDR",
    "Node",
    "NodeNetwork",
    "NodeToolchain",
    "leftovers",
    "locate_node_toolchain",
]

#: The bridge pods are attached to; a name nobody else uses, so ``down`` finds exactly ours.
BRIDGE: Final = "ctaskbr0"
#: The pods' subnet on :data:`BRIDGE` and its gateway (an address of this machine).
POD_CIDR: Final = "10.200.0.0/24"
GATEWAY: Final = "10.200.0.1"
GATEWAY_PREFIX: Final = 24
#: Routed to ``unreachable`` (the bridge's /24 is more specific and wins for real pods).
POD_SUPERNET: Final = "10.200.0.0/16"
#: The routing protocol number our routes carry, so they are found and flushed exactly.
ROUTE_PROTO: Final = "211"
#: The comment on every iptables rule we add ourselves.
IPTABLES_COMMENT: Final = "captchatask-testbed"
#: The node's name (the kubelet's ``--hostname-override``).
NODE_NAME: Final = "captchatask-node"
#: The pod sandbox image; fully qualified, because containerd looks up ``x/y:z`` as
#: ``docker.io/x/y:z`` and then tries that registry.
PAUSE_IMAGE: Final = "localhost/captchatask/pause:testbed"
#: The cluster's DNS domain (CoreDNS serves it; the kubelet writes it into pods' resolv.conf).
CLUSTER_DOMAIN: Final = "cluster.local"
#: CoreDNS's identity and the RBAC kubeadm gives it (read Services, EndpointSlices, namespaces).
DNS_USER: Final = "system:coredns"
_DNS_RBAC: Final = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:coredns"},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "system:coredns"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:coredns",
        },
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": DNS_USER}],
    },
]
#: containerd's namespace for Kubernetes.
CONTAINERD_NAMESPACE: Final = "k8s.io"
#: Where runc's shim keeps the state of ``k8s.io`` containers even when containerd's own state
#: directory is elsewhere (found at clean-up).
RUNC_STATE: Final = Path("/run/containerd/runc") / CONTAINERD_NAMESPACE
#: Where the cgroup v1 controllers are mounted.
CGROUP_ROOT: Final = "/sys/fs/cgroup"
#: Debian's CNI plugin directory (package containernetworking-plugins).
CNI_BIN_DIR: Final = Path("/usr/lib/cni")

#: The longest socket path containerd accepts: its ttrpc listener refuses more than 104 bytes
#: (the portable ``sun_path`` size), below Linux's own 107.
MAX_SOCKET_PATH: Final = 104
#: Where containerd's sockets go when the state directory is too deep for them (a pytest
#: temporary directory easily is): one short directory per state directory, removed by ``down``.
SHORT_SOCKET_ROOT: Final = Path("/run/captchatask")
#: Seconds the node may take to register and become Ready (kubelet's first sync is slow).
NODE_READY_TIMEOUT: Final = 180.0
#: Seconds ``stop`` waits for the kubelet to tear pods down before stopping it anyway.
POD_TEARDOWN_TIMEOUT: Final = 60.0
#: Seconds of one command run by the node (ip, iptables, ctr).
COMMAND_TIMEOUT: Final = 60.0

#: The command that builds the node's binaries, named in every "missing" message.
NODE_BUILD_HINT: Final = "hack/build-binaries.sh --node (make node-binaries)"
NODE_PACKAGES_HINT: Final = "make node-packages (hack/system-packages.sh node images, as root)"


@dataclass(frozen=True)
class NodeToolchain:
    """The node's binaries: Kubernetes' from the binary cache, the rest from Debian packages."""

    kubelet: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kube_proxy: Path
    pause: Path
    coredns: Path
    containerd: Path
    ctr: Path
    runc: Path


def _which(name: str, *extra: Path) -> Path | None:
    hit = shutil.which(name)
    if hit:
        return Path(hit)
    for folder in extra:
        if os.access(folder / name, os.X_OK):
            return folder / name
    return None


def locate_node_toolchain(bin_dir: Path) -> NodeToolchain:
    """Find the node's binaries, or fail naming the command that provides the missing ones.

    Parameters
    ----------
    bin_dir
        The control plane's binary folder (``$TESTBIN_DIR/bin``), where ``--node`` builds go.

    Returns
    -------
    NodeToolchain
        The resolved binaries.

    Raises
    ------
    MissingBinaryError
        If anything is missing, or the process is not root (a node needs mounts, network
        namespaces and iptables).
    """
    built = (
        "kubelet",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
        "pause",
        "coredns",
    )
    missing_built = [name for name in built if not os.access(bin_dir / name, os.X_OK)]
    sbin = (Path("/usr/sbin"), Path("/sbin"))
    system = {name: _which(name, *sbin) for name in ("containerd", "ctr", "runc", "iptables")}
    system["conntrack"] = _which("conntrack", *sbin)
    missing_system = [name for name, path in system.items() if path is None]
    missing_system += [
        f"CNI {p}"
        for p in ("bridge", "host-local", "loopback")
        if not os.access(CNI_BIN_DIR / p, os.X_OK)
    ]
    problems = []
    if missing_built:
        problems.append(
            f"{', '.join(missing_built)} not in {bin_dir} (${TESTBIN_ENV}/bin): build them with "
            f"`{NODE_BUILD_HINT}`"
        )
    if missing_system:
        problems.append(
            f"{', '.join(missing_system)} not installed: run `{NODE_PACKAGES_HINT}`, which "
            "installs the Debian packages containerd runc containernetworking-plugins "
            "iptables conntrack"
        )
    if os.geteuid() != 0:
        problems.append("a test bed node needs root (mounts, network namespaces, iptables)")
    if problems:
        raise MissingBinaryError("cannot start the node: " + "; ".join(problems))
    return NodeToolchain(
        kubelet=bin_dir / "kubelet",
        kube_controller_manager=bin_dir / "kube-controller-manager",
        kube_scheduler=bin_dir / "kube-scheduler",
        kube_proxy=bin_dir / "kube-proxy",
        pause=bin_dir / "pause",
        coredns=bin_dir / "coredns",
        containerd=_required(system["containerd"]),
        ctr=_required(system["ctr"]),
        runc=_required(system["runc"]),
    )


def _required(path: Path | None) -> Path:
    assert path is not None
    return path


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a host command (ip, iptables, ctr), returning stdout; raise with its stderr."""
    result = subprocess.run(  # noqa: S603 - fixed commands built here
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        raise ControlPlaneError(
            f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


class NodeNetwork:
    """The bridge, routes, forwarding and the one iptables rule of the node.

    Parameters
    ----------
    state_dir
        Where the previous ``ip_forward`` value is kept, to be restored by :meth:`destroy`.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @property
    def _forward_file(self) -> Path:
        return self.state_dir / "node" / "ip_forward.before"

    def create(self) -> None:
        """Create the bridge with the gateway address, the routes and the forwarding rule.

        Raises
        ------
        ControlPlaneError
            If the bridge exists already: another test bed's node runs on this machine, and
            two kube-proxies would fight over the same iptables chains.
        """
        if _link_exists(BRIDGE):
            raise ControlPlaneError(
                f"network interface {BRIDGE} exists: another test bed node runs on this machine "
                "(stop it with `captchatask testbed down`; only one node fits one machine)"
            )
        self._forward_file.parent.mkdir(parents=True, exist_ok=True)
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        self._forward_file.write_text(forward.read_text())
        # The bridge exists before kube-apiserver starts so it can listen on the gateway; the
        # CNI bridge plugin adopts it and finds the gateway address already there.
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{GATEWAY}/{GATEWAY_PREFIX}", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for cidr in (POD_SUPERNET, SERVICE_CLUSTER_IP_RANGE):
            _run(["ip", "route", "add", "unreachable", cidr, "proto", ROUTE_PROTO])
        # Pod to Service is routed through this machine (DNAT by kube-proxy), so forwarding
        # must be on; the rule below keeps forwarded pod traffic on the bridge.
        forward.write_text("1\n")
        _run(_forward_rule("-I"))

    def destroy(self) -> None:
        """Remove the rule, routes, bridge (and any veth left on it); restore ``ip_forward``."""
        for _ in range(10):  # one per `up` that failed half-way, at most
            if not _iptables_rule_present():
                break
            _run(_forward_rule("-D"), check=False)
        _run(["ip", "route", "flush", "proto", ROUTE_PROTO], check=False)
        if _link_exists(BRIDGE):
            for port in Path(f"/sys/class/net/{BRIDGE}/brif").iterdir():
                _run(["ip", "link", "del", port.name], check=False)
            _run(["ip", "link", "del", BRIDGE], check=False)
        if self._forward_file.exists():
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self._forward_file.read_text())
            self._forward_file.unlink()


def _forward_rule(action: str) -> list[str]:
    """The FORWARD rule that rejects pod traffic bound for any interface but the bridge."""
    return [
        "iptables", "-w", action, "FORWARD", "-i", BRIDGE, "!", "-o", BRIDGE,
        "-m", "comment", "--comment", IPTABLES_COMMENT, "-j", "REJECT",
    ]  # fmt: skip


def _iptables_rule_present() -> bool:
    return (
        subprocess.run(  # noqa: S603
            _forward_rule("-C"), capture_output=True, timeout=COMMAND_TIMEOUT, check=False
        ).returncode
        == 0
    )


@dataclass(frozen=True)
class _NodePorts:
    kubelet: int
    kubelet_healthz: int
    controller_manager: int
    scheduler: int
    proxy_healthz: int
    proxy_metrics: int
    dns_ready: int


class Node:
    """containerd and the node components of a running :class:`ControlPlane`.

    Parameters
    ----------
    plane
        A control plane started with ``address=GATEWAY, node=True`` (see :meth:`start`).
    progress
        Called with a human-readable line while starting and stopping.
    """

    def __init__(self, plane: ControlPlane, *, progress: Progress | None = None) -> None:
        self.plane = plane
        self._progress = progress
        self._toolchain: NodeToolchain | None = None
        self._ports: _NodePorts | None = None
        self._processes: dict[str, ManagedProcess] = {}

    # -- layout -----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Everything of the node lives below this directory of the test bed's state."""
        return self.plane.state_dir / "node"

    @property
    def containerd_socket(self) -> Path:
        """The socket of our own containerd (never the system one).

        Under the state directory when the path fits containerd's limit (with ``.ttrpc``),
        otherwise in a short directory named after the state directory, so any --state-dir works.
        """
        socket = self.root / "containerd" / "containerd.sock"
        if len(f"{socket}.ttrpc".encode()) <= MAX_SOCKET_PATH:
            return socket
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return SHORT_SOCKET_ROOT / digest / "containerd.sock"

    @property
    def state_file(self) -> Path:
        """The record of the node's processes (next to the control plane's)."""
        return self.plane.state_dir / "node.json"

    @property
    def toolchain(self) -> NodeToolchain:
        """The node binaries (located on first use)."""
        if self._toolchain is None:
            self._toolchain = locate_node_toolchain(self.plane.toolchain.bin_dir)
        return self._toolchain

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by component, for leak checks."""
        return {name: p.pid for name, p in self._processes.items()}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start containerd and the node components; wait until the node is Ready.

        Raises
        ------
        MissingBinaryError
            If a binary is missing (the message names the command that provides it).
        ControlPlaneError
            If a component fails; the message quotes its log.
        """
        toolchain = self.toolchain
        self.root.mkdir(parents=True, exist_ok=True)
        self.containerd_socket.parent.mkdir(parents=True, exist_ok=True)
        ports = free_ports(7)
        self._ports = _NodePorts(*ports)
        self._write_state()
        self._start_containerd(toolchain)
        self._import_pause_image(toolchain)
        self._start_dns(toolchain)
        self._start_controller_manager(toolchain)
        self._start_scheduler(toolchain)
        self._start_kubelet(toolchain)
        # kube-proxy reads its node's object at start (and is unhealthy without it).
        self._wait_node_ready()
        self._start_proxy(toolchain)
        self._wait_default_service_account()

    def stop(self) -> None:
        """Tear pods down through the kubelet, stop every process, sweep what remains."""
        # The controllers first: with them running, every deleted pod of a Deployment comes
        # straight back and the kubelet never finishes tearing down.
        for name in ("kube-controller-manager", "kube-scheduler"):
            self._terminate(name)
        if self._processes.get("kubelet") is not None and self.plane.is_running():
            self._delete_all_pods()
        for name in ("kubelet", "kube-proxy", "coredns"):
            self._terminate(name)
        self._kill_containers()
        containerd = self._processes.get("containerd")
        if containerd is not None:
            containerd.terminate()
        self._kill_shims()
        self._delete_runc_state()
        _remove_cgroups()
        self._unmount_all()
        self._clean_iptables()
        if self.containerd_socket.parent.parent == SHORT_SOCKET_ROOT:
            shutil.rmtree(self.containerd_socket.parent, ignore_errors=True)
            with contextlib.suppress(OSError):
                SHORT_SOCKET_ROOT.rmdir()  # only if no other state directory uses it
        if self.state_file.exists():
            self._write_state()

    # -- persistence ------------------------------------------------------------------------

    @classmethod
    def attach(cls, plane: ControlPlane, *, progress: Progress | None = None) -> Node | None:
        """Rebuild a handle on the node recorded next to ``plane``; None without a record."""
        node = cls(plane, progress=progress)
        try:
            data = json.loads(node.state_file.read_text())
        except FileNotFoundError:
            return None
        # A record from another version of this module must still let `down` clean up: the
        # ports and binaries are only needed to start, so a mismatch just leaves them unknown.
        with contextlib.suppress(TypeError):
            node._ports = _NodePorts(**data["ports"]) if data.get("ports") else None
        with contextlib.suppress(TypeError):
            recorded = data.get("toolchain") or {}
            node._toolchain = NodeToolchain(**{k: Path(v) for k, v in recorded.items()})
        node._processes = {
            name: ManagedProcess.from_json(name, record)
            for name, record in data.get("processes", {}).items()
        }
        return node

    def _write_state(self) -> None:
        data = {
            "ports": vars(self._ports) if self._ports else None,
            "toolchain": (
                {k: str(v) for k, v in vars(self._toolchain).items()} if self._toolchain else None
            ),
            "processes": {name: p.to_json() for name, p in self._processes.items()},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)

    # -- components -------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)

    def _launch(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess.launch(
            name=name, argv=argv, log=self.plane.logs_dir / f"{name}.log",
            marker=str(self.plane.state_dir),
        )  # fmt: skip
        self._processes[name] = process
        self._write_state()
        return process

    def _tool(self, name: str) -> Path:
        """A binary for clean-up, found even when the recorded toolchain is unknown."""
        if self._toolchain is not None:
            return Path(getattr(self._toolchain, name.replace("-", "_")))
        if name.startswith("kube"):
            return self.plane.toolchain.bin_dir / name
        return _which(name, Path("/usr/sbin"), Path("/sbin")) or Path(name)

    def _require_ports(self) -> _NodePorts:
        if self._ports is None:
            raise ControlPlaneError("the node has not been started")
        return self._ports

    def _start_containerd(self, toolchain: NodeToolchain) -> None:
        base = self.root / "containerd"
        cni_conf = self.root / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-captchatask.conflist").write_text(json.dumps(_cni_config(self.root)))
        config = base / "config.toml"
        base.mkdir(parents=True, exist_ok=True)
        config.write_text(
            _containerd_config(
                root=base / "root", state=base / "state", socket=self.containerd_socket,
                cni_conf=cni_conf, runc=toolchain.runc, opt=base / "opt",
            )
        )  # fmt: skip
        self._say(f"starting containerd on {self.containerd_socket}")
        process = self._launch("containerd", [str(toolchain.containerd), f"--config={config}"])
        self._wait("containerd", process, self._containerd_ready)

    def _ctr(self, *args: str, check: bool = True) -> str:
        return _run(
            [
                str(self._tool("ctr")), f"--address={self.containerd_socket}",
                f"--namespace={CONTAINERD_NAMESPACE}", *args,
            ],
            check=check,
        )  # fmt: skip

    def _containerd_ready(self) -> bool:
        if not self.containerd_socket.exists():
            return False
        try:
            self._ctr("version")
        except (ControlPlaneError, subprocess.TimeoutExpired):
            return False
        return True

    def _import_pause_image(self, toolchain: NodeToolchain) -> None:
        archive = write_oci_archive(
            self.root / "images" / "pause.tar",
            name=PAUSE_IMAGE,
            files=[ImageFile("pause", toolchain.pause.read_bytes(), 0o755)],
            entrypoint=["/pause"],
        )
        self.import_image(archive)

    def import_image(self, archive: Path) -> None:
        """Import an OCI (or docker) image archive into the node's containerd.

        Pods must name the image fully qualified (``docker.io/library/x:1``, ``localhost/x:1``)
        and use ``imagePullPolicy: Never``: containerd looks a short name up as
        ``docker.io/...`` and would try that registry.
        """
        self._say(f"importing {archive.name} into containerd")
        self._ctr("images", "import", "--all-platforms", str(archive))

    def _kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        return self.plane.user_kubeconfig(
            user, groups, path=self.root / "kubeconfigs" / f"{user.replace(':', '-')}.kubeconfig"
        )

    def _start_dns(self, toolchain: NodeToolchain) -> None:
        """Start CoreDNS on the gateway: Services by name, as a real cluster resolves them.

        It runs as a process of the machine (no image of it can be pulled) with its own
        identity, bound to the same ClusterRole kubeadm gives it. It has no ``forward``: a name
        outside the cluster gets no answer instead of a query leaving the machine.
        """
        ports = self._require_ports()
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_DNS_RBAC))
        kubeconfig = self._kubeconfig(DNS_USER)
        corefile = self.root / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {GATEWAY}
    errors
    ready {LOOPBACK}:{ports.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} {KUBECONFIG_CONTEXT}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        self._say(f"starting CoreDNS on {GATEWAY}:53")
        process = self._launch("coredns", [str(toolchain.coredns), "-conf", str(corefile)])
        self._wait(
            "CoreDNS /ready",
            process,
            lambda: _http_ok(f"http://{LOOPBACK}:{ports.dns_ready}/ready"),
        )

    def _start_controller_manager(self, toolchain: NodeToolchain) -> None:
        ports = self._require_ports()
        pki = self.plane.pki_dir
        kubeconfig = self._kubeconfig("system:kube-controller-manager")
        self._say("starting kube-controller-manager")
        process = self._launch(
            "kube-controller-manager",
            [
                str(toolchain.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                # The token controller signs legacy Secrets-based tokens and the root CA goes
                # into every namespace's kube-root-ca.crt, which projected token volumes read.
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'serving-ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={ports.controller_manager}",
                f"--cert-dir={self.root / 'controller-manager'}",
            ],
        )
        self._wait(
            "kube-controller-manager /healthz",
            process,
            lambda: _https_ok(f"https://{LOOPBACK}:{ports.controller_manager}/healthz"),
        )

    def _start_scheduler(self, toolchain: NodeToolchain) -> None:
        ports = self._require_ports()
        kubeconfig = self._kubeconfig("system:kube-scheduler")
        self._say("starting kube-scheduler")
        process = self._launch(
            "kube-scheduler",
            [
                str(toolchain.kube_scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={ports.scheduler}",
                f"--cert-dir={self.root / 'scheduler'}",
            ],
        )
        self._wait(
            "kube-scheduler /healthz",
            process,
            lambda: _https_ok(f"https://{LOOPBACK}:{ports.scheduler}/healthz"),
        )

    def _start_proxy(self, toolchain: NodeToolchain) -> None:
        ports = self._require_ports()
        config = self.root / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(self._kubeconfig("system:kube-proxy"))},
                    "mode": "iptables",
                    "clusterCIDR": POD_CIDR,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": GATEWAY,
                    "healthzBindAddress": f"{LOOPBACK}:{ports.proxy_healthz}",
                    "metricsBindAddress": f"{LOOPBACK}:{ports.proxy_metrics}",
                    # NodePorts only on the bridge, never on the machine's external interface.
                    "nodePortAddresses": [f"{GATEWAY}/32"],
                    # Zero leaves the machine's conntrack sysctls alone (by default kube-proxy
                    # rewrites the established and close-wait timeouts machine-wide).
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                }
            )
        )
        self._say("starting kube-proxy (iptables mode)")
        process = self._launch("kube-proxy", [str(toolchain.kube_proxy), f"--config={config}"])
        self._wait(
            "kube-proxy /healthz",
            process,
            lambda: _http_ok(f"http://{LOOPBACK}:{ports.proxy_healthz}/healthz"),
        )

    def _start_kubelet(self, toolchain: NodeToolchain) -> None:
        ports = self._require_ports()
        root_dir = self.root / "kubelet"
        root_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    # The build machines have the cgroup v1 hierarchy, which kubelet >= 1.35
                    # refuses unless told; there is no systemd, hence cgroupfs.
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "failSwapOn": False,
                    "cgroupsPerQOS": False,
                    "enforceNodeAllocatable": [],
                    "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
                    "address": GATEWAY,
                    "port": ports.kubelet,
                    "readOnlyPort": 0,
                    "healthzBindAddress": LOOPBACK,
                    "healthzPort": ports.kubelet_healthz,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(self.plane.pki_dir / "client-ca.crt")},
                    },
                    "authorization": {"mode": "Webhook"},
                    "podLogsDir": str(self.root / "pod-logs"),
                    "volumePluginDir": str(self.root / "volume-plugins"),
                    "staticPodPath": "",
                    "registerNode": True,
                    # The machine is shared: never evict pods because others filled the disk.
                    "evictionHard": {
                        "memory.available": "1Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "serializeImagePulls": False,
                    # Our CoreDNS on the gateway; names outside the cluster get no answer.
                    "clusterDNS": [GATEWAY],
                    "clusterDomain": CLUSTER_DOMAIN,
                }
            )
        )
        kubeconfig = self._kubeconfig(f"system:node:{NODE_NAME}", ["system:nodes"])
        self._say(f"starting kubelet (node {NODE_NAME} at {GATEWAY})")
        process = self._launch(
            "kubelet",
            [
                str(toolchain.kubelet),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={root_dir}",
                f"--cert-dir={self.root / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                # The node's InternalIP, which kube-apiserver uses for logs and exec; by default
                # it would be the machine's external address.
                f"--node-ip={GATEWAY}",
            ],
        )
        self._wait(
            "kubelet /healthz",
            process,
            lambda: _http_ok(f"http://{LOOPBACK}:{ports.kubelet_healthz}/healthz"),
        )

    def _wait(self, what: str, process: ManagedProcess, probe: Callable[[], bool]) -> None:
        self._wait_for(what, probe, self.plane.start_timeout, process)

    def _wait_for(
        self,
        what: str,
        probe: Callable[[], bool],
        timeout: float,
        process: ManagedProcess | None = None,
    ) -> None:
        started = time.monotonic()
        next_report = started + 5
        while not probe():
            now = time.monotonic()
            if process is not None and not process.alive():
                raise ControlPlaneError(
                    f"{process.name} exited while waiting for {what}; {process.log_tail()}"
                )
            if now - started > timeout:
                tail = f"; {process.log_tail()}" if process is not None else ""
                raise ControlPlaneError(f"{what} not ready after {timeout:.0f}s{tail}")
            if now >= next_report:
                self._say(f"still waiting for {what} ({now - started:.0f}s)")
                next_report = now + 5
            time.sleep(max(POLL_INTERVAL, 0.5))

    def _node_ready(self) -> bool:
        result = self.plane.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _wait_node_ready(self) -> None:
        self._wait_for(
            f"node {NODE_NAME} Ready", self._node_ready, NODE_READY_TIMEOUT,
            self._processes["kubelet"],
        )  # fmt: skip
        self._say(f"node {NODE_NAME} is Ready")

    def _wait_default_service_account(self) -> None:
        """Wait for ``default/default``: pods are refused until the controller creates it."""

        def exists() -> bool:
            result = self.plane.kubectl("get", "serviceaccount", "default", check=False)
            return result.returncode == 0

        self._wait_for("ServiceAccount default/default", exists, self.plane.start_timeout)

    # -- teardown ---------------------------------------------------------------------------

    def _terminate(self, name: str) -> None:
        process = self._processes.get(name)
        if process is not None:
            process.terminate()

    def _delete_all_pods(self) -> None:
        """Delete every pod and let the kubelet stop them (CNI DEL, netns removal, unmounts)."""
        self._say("deleting every pod so the kubelet tears them down")
        self.plane.kubectl(
            "delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force",
            "--wait=false", check=False,
        )  # fmt: skip
        deadline = time.monotonic() + POD_TEARDOWN_TIMEOUT
        while time.monotonic() < deadline:
            if not self._running_tasks():
                return
            time.sleep(1)
        self._say("pods still running after the kubelet had its chance; killing them")

    def _running_tasks(self) -> list[str]:
        if self._processes.get("containerd") is None or not self._containerd_ready():
            return []
        out = self._ctr("tasks", "list", check=False)
        return [
            line.split()[0]
            for line in out.splitlines()[1:]
            if line.strip() and "STOPPED" not in line
        ]

    def _kill_containers(self) -> None:
        """Kill and delete whatever containers the kubelet left in our containerd."""
        if self._processes.get("containerd") is None or not self._containerd_ready():
            return
        for task in self._running_tasks():
            self._ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for line in self._ctr("tasks", "list", check=False).splitlines()[1:]:
            if line.strip():
                self._ctr("tasks", "delete", "--force", line.split()[0], check=False)

    def _kill_shims(self) -> None:
        """Kill containerd shims (and their containers) still serving our containerd."""
        marker = str(self.root)
        for pid in _pids():
            cmdline = _cmdline(pid)
            if cmdline and "containerd-shim" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def _delete_runc_state(self) -> None:
        """Delete runc's record of containers whose shim was killed (it lives outside our dir).

        Only this node's containerd uses the ``k8s.io`` namespace on the machine (the system
        containerd is never started by the test bed), so every record there is ours.
        """
        if not RUNC_STATE.is_dir():
            return
        for entry in RUNC_STATE.iterdir():
            runc = [str(self._tool("runc")), "--root", str(RUNC_STATE)]
            _run([*runc, "delete", "--force", entry.name], check=False)
        # The shim's (now empty) folders, down to /run/containerd if nothing else uses it.
        for folder in (
            RUNC_STATE,
            RUNC_STATE.parent,
            RUNC_STATE.parents[1] / "s",
            RUNC_STATE.parents[1],
        ):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _unmount_all(self) -> None:
        """Unmount everything below the state directory, deepest first.

        That covers the kubelet's bind mount of its root onto itself, pod volumes (the
        projected token tmpfs), container root filesystems and the pods' network namespaces
        (containerd keeps them under its state directory: ``netns_mounts_under_state_dir``).
        """
        for mount in sorted(_mounts_below(self.plane.state_dir), key=len, reverse=True):
            _run(["umount", "--lazy", mount], check=False)

    def _clean_iptables(self) -> None:
        """Remove kube-proxy's and the kubelet's chains (``KUBE-*``) from every table."""
        kube_proxy = self._tool("kube-proxy")
        if os.access(kube_proxy, os.X_OK):
            _run([str(kube_proxy), "--cleanup"], check=False)
        for binary in ("iptables", "ip6tables"):
            if shutil.which(binary) is not None:
                _remove_kube_chains(binary)


def _remove_kube_chains(binary: str) -> None:
    """Delete every rule that jumps to a ``KUBE-`` chain, then the chains themselves."""
    for table in ("filter", "nat", "mangle"):
        rules = _run([binary, "-w", "-t", table, "-S"], check=False).splitlines()
        chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
        for rule in rules:
            parts = rule.split()
            if (
                rule.startswith("-A ")
                and not parts[1].startswith("KUBE-")
                and any(p.startswith("KUBE-") for p in parts[2:])
            ):
                _run([binary, "-w", "-t", table, "-D", *parts[1:]], check=False)
        for chain in chains:
            _run([binary, "-w", "-t", table, "-F", chain], check=False)
        for chain in chains:
            _run([binary, "-w", "-t", table, "-X", chain], check=False)


def _our_cgroups() -> list[Path]:
    """The cgroup folders containerd made for pods (one ``k8s.io`` per v1 controller)."""
    return sorted(Path(CGROUP_ROOT).glob(f"*/{CONTAINERD_NAMESPACE}"))


def _remove_cgroups() -> None:
    """Remove the (by now empty) pod cgroups, deepest first; a busy one stays and is reported."""
    for top in _our_cgroups():
        folders = [top, *(p for p in top.rglob("*") if p.is_dir())]
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    return mounts


def leftovers(state_dir: Path) -> list[str]:
    """List what a node of ``state_dir`` (or any node of ours) left on this machine.

    Parameters
    ----------
    state_dir
        The test bed's state directory.

    Returns
    -------
    list of str
        One line per leftover: processes naming the state directory, mounts below it, our
        bridge, our routes, iptables rules with our comment or a ``KUBE-`` chain. Empty when
        clean.
    """
    found = []
    marker = str(state_dir)
    for pid in _pids():
        cmdline = _cmdline(pid)
        if pid != os.getpid() and cmdline and marker in cmdline and pid_alive(pid):
            found.append(f"process {pid}: {cmdline[:120]}")
    found += [f"mount {m}" for m in _mounts_below(state_dir)]
    if _link_exists(BRIDGE):
        found.append(f"link {BRIDGE}")
    found += [f"cgroup {folder}" for folder in _our_cgroups()]
    if RUNC_STATE.is_dir():
        found += [f"runc state {entry}" for entry in RUNC_STATE.iterdir()]
    routes = _run(["ip", "route", "show", "proto", ROUTE_PROTO], check=False).strip()
    found += [f"route {r}" for r in routes.splitlines() if r]
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary) is None:
            continue
        for line in _run([f"{binary}-save"], check=False).splitlines():
            if IPTABLES_COMMENT in line or "KUBE-" in line:
                found.append(f"{binary} {line}")
    return found


def _cni_config(root: Path) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "captchatask",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                # No masquerading: pods never talk to anything beyond this machine.
                "ipMasq": False,
                # A pod reaching itself through a Service comes back through the bridge.
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(root / "cni" / "ipam"),
                },
            }
        ],
    }


def _containerd_config(
    *, root: Path, state: Path, socket: Path, cni_conf: Path, runc: Path, opt: Path
) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return f"""version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

{cri}
  sandbox_image = "{PAUSE_IMAGE}"
  # The machine's root lacks CAP_SYS_RESOURCE: without this every sandbox fails with runc's
  # "can't get final child's PID from pipe: EOF" (it may not lower oom_score_adj to -998).
  restrict_oom_score_adj = true
  stream_server_address = "{LOOPBACK}"
  stream_server_port = "0"
  enable_selinux = false
  # Pod network namespaces under our state directory, not /var/run/netns: found and removed
  # exactly at clean-up.
  netns_mounts_under_state_dir = true

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri[:-1]}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri[:-1]}.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  SystemdCgroup = false

{cri[:-1]}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""


def _https_ok(url: str) -> bool:
    """Probe a component's /healthz over TLS with its self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, ssl.SSLError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False
