"""The :class:`ControlPlane`: etcd and kube-apiserver on loopback, wired like envtest does."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import yaml

from captchatask import crds, pki
from captchatask.testbed.errors import ControlPlaneError, KubectlError
from captchatask.testbed.processes import POLL_INTERVAL, ManagedProcess
from captchatask.testbed.toolchain import LOOPBACK, Toolchain, free_ports, locate_toolchain

__all__ = ["STATE_FILE", "ControlPlane", "Kubectl", "Progress", "default_crd_documents"]

#: How often the whole start is attempted. envtest retries five times, mostly for port races
#: between picking a free port and the process binding it; three is plenty on one machine.
START_ATTEMPTS: Final = 3

#: Seconds each process may take to become ready. envtest's 20 s is too tight for a 2-core CI
#: machine where kube-apiserver's first start (bootstrap RBAC, priority levels) is slowest.
DEFAULT_START_TIMEOUT: Final = 60.0

#: Seconds between "still waiting" progress lines.
PROGRESS_INTERVAL: Final = 5.0

#: Timeout of one readiness probe; a paused apiserver must not hang the probe loop.
PROBE_TIMEOUT: Final = 2.0

#: Seconds a kubectl invocation may take before it is treated as hung.
KUBECTL_TIMEOUT: Final = 120.0

#: Ranges and identities passed to kube-apiserver.
SERVICE_CLUSTER_IP_RANGE: Final = "10.0.0.0/24"
#: The ClusterIP of the ``kubernetes`` Service: the first address of the range.
KUBERNETES_SERVICE_IP: Final = "10.0.0.1"
#: The names pods use for the API server, all in its serving certificate.
KUBERNETES_DNS_NAMES: Final = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
#: The identity kube-apiserver uses towards the kubelet (logs, exec, port-forward).
KUBELET_CLIENT_USER: Final = "kube-apiserver-kubelet-client"
ADMIN_USER: Final = "admin"
ADMIN_GROUPS: Final = ("system:masters",)

#: Name of the cluster and context in every kubeconfig written here.
KUBECONFIG_CONTEXT: Final = "captchatask-testbed"

#: The file that records a running test bed; its presence also marks a directory as ours, so
#: ``down`` never deletes a directory it did not create.
STATE_FILE: Final = "testbed.json"
STATE_FORMAT: Final = 1

#: Field manager for server-side apply of CRDs.
FIELD_MANAGER: Final = "captchatask-testbed"

#: Seconds to wait for CRDs to become Established.
CRD_ESTABLISH_TIMEOUT: Final = 60

#: The media type of aggregated discovery (``/apis`` in one document), which kubectl reads.
AGGREGATED_DISCOVERY: Final = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"

#: Lifetime requested for service-account tokens (the API's minimum is 600 s).
DEFAULT_TOKEN_SECONDS: Final = 3600

#: Status codes the probes care about.
HTTP_OK: Final = 200
HTTP_CREATED: Final = 201
HTTP_CONFLICT: Final = 409

Progress = Callable[[str], None]


class Kubectl(Protocol):
    """Runs the real kubectl against the test bed (the type of the ``kubectl`` fixture)."""

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl *args``; raise :class:`KubectlError` on failure when ``check``."""
        ...


def default_crd_documents() -> list[dict[str, Any]]:
    """Return captchatask's CRDs (``charts/captchatask/crds/``, via :mod:`captchatask.crds`)."""
    return crds.crd_documents()


@dataclass(frozen=True)
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


class ControlPlane:
    """etcd and kube-apiserver on loopback, with throw-away PKI and an admin kubeconfig.

    Parameters
    ----------
    state_dir
        A directory this control plane owns: etcd data, certificates, logs and kubeconfigs go
        here. It is created if missing and kept after :meth:`stop` (the logs are useful).
    start_timeout
        Seconds each process may take to become ready.
    address
        Where kube-apiserver listens and what it advertises. Loopback unless the test bed has a
        node: pods cannot reach the host's loopback, so a node's control plane listens on the
        pod bridge's gateway address instead (still an address of this machine only).
    node
        Configure kube-apiserver for a node: the Node authorizer and NodeRestriction, the
        ServiceAccount admission plugin (which mounts tokens into pods) and a client
        certificate for talking to the kubelet (logs, exec).
    progress
        Called with a human-readable line while starting and waiting; None for silence.

    Examples
    --------
    >>> with ControlPlane(tmp_path) as plane:  # doctest: +SKIP
    ...     plane.kubectl("get", "namespaces")
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        address: str = LOOPBACK,
        node: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.start_timeout = start_timeout
        self.address = address
        self.node = node
        self._progress = progress
        self._toolchain: Toolchain | None = None
        self._ports: _Ports | None = None
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None
        #: Seconds the last successful :meth:`start` took (None before that).
        self.startup_seconds: float | None = None

    # -- layout -----------------------------------------------------------------------------

    @property
    def pki_dir(self) -> Path:
        """Certificates and keys (also kube-apiserver's ``--cert-dir``)."""
        return self.state_dir / "pki"

    @property
    def logs_dir(self) -> Path:
        """``etcd.log`` and ``kube-apiserver.log``."""
        return self.state_dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user ``admin`` in ``system:masters``)."""
        return self.state_dir / "kubeconfig"

    @property
    def kubectl_cache_dir(self) -> Path:
        """The private kubectl discovery/HTTP cache of this control plane (``KUBECACHEDIR``).

        kubectl caches API discovery per ``host_port`` under ``~/.kube/cache`` for hours. A
        cache filled while the CRDs were still being installed made ``kubectl get captcha``
        fail right after ``up`` ("doesn't have a resource type"), and loopback ports get
        recycled between test beds. So every kubectl run through :meth:`kubectl` or
        :meth:`env` uses this private cache, wiped after :meth:`install_crds`.
        """
        return self.state_dir / "kubectl-cache"

    @property
    def state_file(self) -> Path:
        """The JSON record that lets a later command find these processes."""
        return self.state_dir / STATE_FILE

    @property
    def server(self) -> str:
        """The API server URL, ``https://<address>:<port>`` (loopback without a node)."""
        return f"https://{self.address}:{self._require_ports().apiserver}"

    @property
    def apiserver_port(self) -> int:
        """kube-apiserver's secure port."""
        return self._require_ports().apiserver

    @property
    def etcd_url(self) -> str:
        """The etcd client URL (plain HTTP on loopback, as in envtest)."""
        return f"http://{LOOPBACK}:{self._require_ports().etcd_client}"

    @property
    def toolchain(self) -> Toolchain:
        """The binaries in use (located on first use)."""
        if self._toolchain is None:
            self._toolchain = locate_toolchain()
        return self._toolchain

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by component (``etcd``, ``kube-apiserver``), for leak checks."""
        return {p.name: p.pid for p in (self._etcd, self._apiserver) if p is not None}

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return an environment for subprocesses that talk to this control plane.

        Parameters
        ----------
        base
            The environment to extend; defaults to ``os.environ``.

        Returns
        -------
        dict of str to str
            ``base`` with ``KUBECONFIG`` set to the admin kubeconfig, ``KUBECACHEDIR`` set to
            :attr:`kubectl_cache_dir` and the binary directory first on ``PATH``.
        """
        env = dict(os.environ if base is None else base)
        path = env.get("PATH", "")
        env["PATH"] = (
            f"{self.toolchain.bin_dir}{os.pathsep}{path}" if path else str(self.toolchain.bin_dir)
        )
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.kubectl_cache_dir)
        return env

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd and kube-apiserver and wait until the API serves namespace ``default``.

        The whole start is retried (fresh ports, fresh data) up to ``START_ATTEMPTS`` times,
        because a free port can be taken by someone else before our process binds it.

        Raises
        ------
        MissingBinaryError
            If a binary is missing (never retried).
        ControlPlaneError
            If every attempt failed; the message quotes the process logs.
        """
        toolchain = self.toolchain
        started = time.monotonic()
        last: ControlPlaneError | None = None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(toolchain)
            except ControlPlaneError as err:
                last = err
                self._say(f"start attempt {attempt}/{START_ATTEMPTS} failed: {err}")
                self._stop_processes()
            except BaseException:
                self._stop_processes()
                raise
            else:
                self.startup_seconds = time.monotonic() - started
                self._say(f"control plane ready at {self.server} in {self.startup_seconds:.1f}s")
                return
        assert last is not None
        raise last

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (SIGTERM, then SIGKILL); files stay for inspection."""
        self._stop_processes()
        if self.state_file.exists():
            self._write_state()

    def pause(self) -> None:
        """Freeze kube-apiserver with SIGSTOP: connections are accepted but never answered."""
        self._require(self._apiserver, "kube-apiserver").signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused kube-apiserver run again (SIGCONT)."""
        self._require(self._apiserver, "kube-apiserver").signal(signal.SIGCONT)

    def stop_apiserver(self, *, grace: float | None = None) -> None:
        """Stop only kube-apiserver; etcd and its data stay, so a restart loses nothing.

        ``grace``: how long SIGTERM may take before SIGKILL (default: the stop timeout). A
        graceful stop closes the listener at once and answers the requests in flight, but open
        watches can hold it until the stop timeout: an outage planned to last seconds (the
        chaos suite's) then lasts that long, unless the grace is short.
        """
        self._require(self._apiserver, "kube-apiserver").terminate(grace=grace)
        self._write_state()

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port with the same certificates and etcd."""
        old = self._require(self._apiserver, "kube-apiserver")
        if old.alive():
            raise ControlPlaneError("kube-apiserver is still running; stop_apiserver() first")
        self._apiserver = ManagedProcess.launch(
            name=old.name, argv=old.argv, log=old.log, marker=old.marker
        )
        self._write_state()
        self._wait_until("kube-apiserver /readyz", self._apiserver, self._apiserver_ready)

    def is_running(self) -> bool:
        """Tell whether both processes are alive and ``/readyz`` answers ok."""
        processes = (self._etcd, self._apiserver)
        return all(p is not None and p.alive() for p in processes) and self._apiserver_ready()

    # -- identities -------------------------------------------------------------------------

    def user_kubeconfig(
        self, user: str, groups: Sequence[str] = (), *, path: Path | None = None
    ) -> Path:
        """Write a kubeconfig for ``user`` in ``groups``, authenticated by a client certificate.

        Parameters
        ----------
        user
            The user name kube-apiserver will see (certificate CN).
        groups
            The groups (certificate O attributes). ``system:masters`` bypasses RBAC.
        path
            Where to write; defaults to ``users/<user>.kubeconfig`` in the state directory.

        Returns
        -------
        Path
            The kubeconfig.
        """
        ca = pki.CertificateAuthority.load(
            cert_path=self.pki_dir / "client-ca.crt", key_path=self.pki_dir / "client-ca.key"
        )
        issued = ca.issue_client(user=user, groups=tuple(groups))
        credentials = {
            "client-certificate-data": base64.b64encode(issued.cert_pem).decode(),
            "client-key-data": base64.b64encode(issued.key_pem).decode(),
        }
        target = path or self.state_dir / "users" / f"{_file_safe(user)}.kubeconfig"
        return self._write_kubeconfig(target, user=user, credentials=credentials)

    def service_account_kubeconfig(
        self,
        namespace: str,
        name: str,
        *,
        expiration_seconds: int = DEFAULT_TOKEN_SECONDS,
        path: Path | None = None,
    ) -> Path:
        """Write a kubeconfig that authenticates as a ServiceAccount via the TokenRequest API.

        The ServiceAccount is created if it does not exist (no controller creates any here).

        Parameters
        ----------
        namespace
            The ServiceAccount's namespace (must exist).
        name
            The ServiceAccount's name.
        expiration_seconds
            Requested token lifetime (at least 600).
        path
            Where to write; defaults to ``users/sa-<namespace>-<name>.kubeconfig``.

        Returns
        -------
        Path
            The kubeconfig.
        """
        base = f"/api/v1/namespaces/{_quote(namespace)}/serviceaccounts"
        body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        status, payload = self._admin_request("POST", base, body)
        if status not in {HTTP_CREATED, HTTP_CONFLICT}:
            raise ControlPlaneError(f"creating ServiceAccount {namespace}/{name}: {payload!r}")
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        status, payload = self._admin_request("POST", f"{base}/{_quote(name)}/token", request)
        if status != HTTP_CREATED:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name}: {payload!r}")
        token = str(json.loads(payload)["status"]["token"])
        target = path or self.state_dir / "users" / f"sa-{namespace}-{_file_safe(name)}.kubeconfig"
        user = f"system:serviceaccount:{namespace}:{name}"
        return self._write_kubeconfig(target, user=user, credentials={"token": token})

    # -- kubectl and CRDs -------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this control plane.

        Parameters
        ----------
        *args
            kubectl arguments, e.g. ``("get", "pods", "-n", "x")``.
        input
            Text fed to kubectl's stdin (for ``-f -``).
        check
            Raise :class:`KubectlError` when kubectl exits non-zero.
        kubeconfig
            Another identity's kubeconfig; defaults to the admin one.

        Returns
        -------
        subprocess.CompletedProcess of str
            The finished process with captured stdout and stderr.
        """
        argv = [str(self.toolchain.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        result = subprocess.run(  # noqa: S603 - argv starts with the resolved kubectl binary
            [*argv, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=KUBECTL_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def install_crds(self, documents: Sequence[Mapping[str, Any]]) -> list[str]:
        """Server-side apply ``documents``; wait until every CRD among them is served.

        Served means Established, in discovery, and a LIST of each version answers 200.

        Parameters
        ----------
        documents
            Kubernetes objects, typically CustomResourceDefinitions.

        Returns
        -------
        list of str
            The names of the CRDs that are now Established.
        """
        if not documents:
            return []
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
            input=yaml.safe_dump_all(list(documents), sort_keys=False),
        )
        definitions = [doc for doc in documents if doc.get("kind") == "CustomResourceDefinition"]
        names = [str(doc["metadata"]["name"]) for doc in definitions]
        if names:
            self._say(f"waiting for {len(names)} CRD(s) to become Established")
            self.kubectl(
                "wait",
                "--for=condition=Established",
                f"--timeout={CRD_ESTABLISH_TIMEOUT}s",
                *(f"customresourcedefinition/{name}" for name in names),
            )
            self._wait_for_discovery(definitions)
            self._wait_for_lists(definitions)
        # Discovery cached by the apply/wait above predates the new types: drop it.
        shutil.rmtree(self.kubectl_cache_dir, ignore_errors=True)
        return names

    def _wait_for_discovery(self, definitions: Sequence[Mapping[str, Any]]) -> None:
        """Wait until aggregated discovery lists every served version of ``definitions``.

        ``Established`` only means the API accepts the resource; discovery, which kubectl uses
        to resolve ``ctask`` or the ``captcha`` category, is updated a moment later. Without this
        wait, ``kubectl get captcha`` right after ``up`` fails with "doesn't have a resource
        type" (envtest's ``WaitForCRDs`` polls discovery for the same reason).
        """
        wanted = {
            (str(d["spec"]["group"]), str(v["name"]), str(d["spec"]["names"]["plural"]))
            for d in definitions
            for v in d["spec"]["versions"]
            if v.get("served", True)
        }
        deadline = time.monotonic() + CRD_ESTABLISH_TIMEOUT
        while not wanted <= self._discovered_resources():
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRDs not in API discovery after {CRD_ESTABLISH_TIMEOUT}s")
            time.sleep(POLL_INTERVAL)

    def _wait_for_lists(self, definitions: Sequence[Mapping[str, Any]]) -> None:
        """Wait until a LIST of every served version of ``definitions`` answers 200.

        Discovery lists a new type before the API server can serve it: until the type's watch
        cache has filled, a LIST answers ``429 storage is (re)initializing``. A tool (or a
        person) that runs the first command right after ``up`` must find the types served.
        """
        paths = [
            f"/apis/{d['spec']['group']}/{v['name']}/{d['spec']['names']['plural']}?limit=1"
            for d in definitions
            for v in d["spec"]["versions"]
            if v.get("served", True)
        ]
        deadline = time.monotonic() + CRD_ESTABLISH_TIMEOUT
        for path in paths:
            while True:
                try:
                    status, body = self._admin_request("GET", path)
                except (OSError, ssl.SSLError) as err:
                    status, body = 0, str(err).encode()
                if status == HTTP_OK:
                    break
                if time.monotonic() > deadline:
                    raise ControlPlaneError(
                        f"LIST {path} still answers {status} after {CRD_ESTABLISH_TIMEOUT}s: "
                        f"{body[:200].decode('utf-8', 'replace')}"
                    )
                time.sleep(POLL_INTERVAL)

    def _discovered_resources(self) -> set[tuple[str, str, str]]:
        """Return (group, version, plural) of every resource in aggregated discovery."""
        try:
            status, body = self._request(
                "GET", "/apis", None, client_cert=True, accept=AGGREGATED_DISCOVERY
            )
        except (OSError, ssl.SSLError):
            return set()
        if status != HTTP_OK:
            return set()
        return {
            (group["metadata"]["name"], version["version"], resource["resource"])
            for group in json.loads(body).get("items", [])
            for version in group.get("versions", [])
            for resource in version.get("resources", [])
        }

    # -- persistence (for the CLI) ----------------------------------------------------------

    @classmethod
    def attach(cls, state_dir: Path, *, progress: Progress | None = None) -> ControlPlane | None:
        """Rebuild a handle on a control plane recorded in ``state_dir`` by another process.

        Parameters
        ----------
        state_dir
            The directory passed to the control plane that wrote the record.
        progress
            As for the constructor.

        Returns
        -------
        ControlPlane or None
            A handle whose processes may or may not still be alive; None without a record.
        """
        plane = cls(state_dir, progress=progress)
        try:
            data = json.loads(plane.state_file.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise ControlPlaneError(f"{plane.state_file} is corrupt ({err}); remove it") from err
        if data.get("format") != STATE_FORMAT:
            raise ControlPlaneError(f"{plane.state_file} has an unknown format")
        plane.address = str(data.get("address", LOOPBACK))
        plane.node = bool(data.get("node", False))
        if data.get("ports"):
            plane._ports = _Ports(**data["ports"])
        toolchain = data.get("toolchain")
        if toolchain:
            plane._toolchain = Toolchain(**{k: Path(v) for k, v in toolchain.items()})
        if data.get("etcd"):
            plane._etcd = ManagedProcess.from_json("etcd", data["etcd"])
        if data.get("apiserver"):
            plane._apiserver = ManagedProcess.from_json("kube-apiserver", data["apiserver"])
        return plane

    def _write_state(self) -> None:
        toolchain = self._toolchain
        data = {
            "format": STATE_FORMAT,
            "address": self.address,
            "node": self.node,
            "ports": vars(self._ports) if self._ports else None,
            "toolchain": {k: str(v) for k, v in vars(toolchain).items()} if toolchain else None,
            "etcd": self._etcd.to_json() if self._etcd else None,
            "apiserver": self._apiserver.to_json() if self._apiserver else None,
            "server": self.server if self._ports else None,
            "kubeconfig": str(self.kubeconfig),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)

    # -- internals --------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)

    def _require_ports(self) -> _Ports:
        if self._ports is None:
            raise ControlPlaneError("the control plane has not been started")
        return self._ports

    @staticmethod
    def _require(process: ManagedProcess | None, name: str) -> ManagedProcess:
        if process is None:
            raise ControlPlaneError(f"{name} has not been started")
        return process

    def _start_once(self, toolchain: Toolchain) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.pki_dir, self.state_dir / "etcd"):
            shutil.rmtree(stale, ignore_errors=True)
        self.pki_dir.mkdir(mode=0o700)
        client_port, peer_port, api_port = free_ports(3)
        self._ports = _Ports(etcd_client=client_port, etcd_peer=peer_port, apiserver=api_port)
        self._write_pki()
        self._write_state()
        marker = str(self.state_dir)

        self._say(f"starting etcd on {self.etcd_url}")
        peer_url = f"http://{LOOPBACK}:{peer_port}"
        self._etcd = ManagedProcess.launch(
            name="etcd",
            argv=[
                str(toolchain.etcd),
                "--name=testbed",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=testbed={peer_url}",
                "--unsafe-no-fsync=true",
            ],
            log=self.logs_dir / "etcd.log",
            marker=marker,
        )
        self._write_state()
        self._wait_until("etcd /health", self._etcd, self._etcd_healthy)

        self._say(f"starting kube-apiserver on {self.server}")
        pki_dir = self.pki_dir
        if self.node:
            node_args = [
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # No controller-manager creates the `default` ServiceAccount, which the
            # ServiceAccount admission plugin would require of every pod.
            node_args = ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
        self._apiserver = ManagedProcess.launch(
            name="kube-apiserver",
            argv=[
                str(toolchain.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={pki_dir}",
                f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
                f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
                f"--secure-port={api_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                *node_args,
                f"--client-ca-file={pki_dir / 'client-ca.crt'}",
                f"--service-account-issuer={self.server}/",
                f"--service-account-key-file={pki_dir / 'sa.pub'}",
                f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
            ],
            log=self.logs_dir / "kube-apiserver.log",
            marker=marker,
        )
        self._write_state()
        self._wait_until("kube-apiserver /readyz", self._apiserver, self._apiserver_ready)

        self._write_kubeconfig(
            self.kubeconfig,
            user=ADMIN_USER,
            credentials={
                # Embedded, not file paths: kopf's kubeconfig login reads only the *-data keys.
                "client-certificate-data": _b64(pki_dir / "admin.crt"),
                "client-key-data": _b64(pki_dir / "admin.key"),
            },
        )
        self._wait_until("namespace default", self._apiserver, self._default_namespace_exists)

    def _write_pki(self) -> None:
        """Create the serving CA, client CA, service-account key pair and admin certificate."""
        pki_dir = self.pki_dir
        serving_ca = pki.CertificateAuthority.create("captchatask-testbed-serving-ca")
        serving_ca.write(cert_path=pki_dir / "serving-ca.crt", key_path=pki_dir / "serving-ca.key")
        # Pods reach the API server through the `kubernetes` Service, so its ClusterIP and DNS
        # names must be in the certificate as well as the address it listens on.
        ip_addresses = tuple(dict.fromkeys((LOOPBACK, self.address, KUBERNETES_SERVICE_IP)))
        serving_ca.issue_serving(
            common_name="localhost", dns_names=KUBERNETES_DNS_NAMES, ip_addresses=ip_addresses
        ).write(cert_path=pki_dir / "apiserver.crt", key_path=pki_dir / "apiserver.key")
        client_ca = pki.CertificateAuthority.create("captchatask-testbed-client-ca")
        client_ca.write(cert_path=pki_dir / "client-ca.crt", key_path=pki_dir / "client-ca.key")
        client_ca.issue_client(user=ADMIN_USER, groups=ADMIN_GROUPS).write(
            cert_path=pki_dir / "admin.crt", key_path=pki_dir / "admin.key"
        )
        if self.node:
            client_ca.issue_client(user=KUBELET_CLIENT_USER, groups=ADMIN_GROUPS).write(
                cert_path=pki_dir / "apiserver-kubelet-client.crt",
                key_path=pki_dir / "apiserver-kubelet-client.key",
            )
        signing_key = pki.generate_signing_key()
        (pki_dir / "sa.pub").write_bytes(pki.public_key_pem(signing_key))
        (pki_dir / "sa.key").touch(mode=0o600)
        (pki_dir / "sa.key").write_bytes(pki.private_key_pem(signing_key))

    def _write_kubeconfig(self, path: Path, *, user: str, credentials: dict[str, str]) -> Path:
        ca_data = _b64(self.pki_dir / "serving-ca.crt")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": KUBECONFIG_CONTEXT,
                    "cluster": {"server": self.server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [
                {
                    "name": KUBECONFIG_CONTEXT,
                    "context": {"cluster": KUBECONFIG_CONTEXT, "user": user},
                }
            ],
            "current-context": KUBECONFIG_CONTEXT,
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _wait_until(self, what: str, process: ManagedProcess, probe: Callable[[], bool]) -> None:
        started = time.monotonic()
        next_report = started + PROGRESS_INTERVAL
        while not probe():
            now = time.monotonic()
            if not process.alive():
                raise ControlPlaneError(
                    f"{process.name} exited while waiting for {what}; {process.log_tail()}"
                )
            if now - started > self.start_timeout:
                raise ControlPlaneError(
                    f"{what} not ready after {self.start_timeout:.0f}s; {process.log_tail()}"
                )
            if now >= next_report:
                self._say(f"still waiting for {what} ({now - started:.0f}s)")
                next_report = now + PROGRESS_INTERVAL
            time.sleep(POLL_INTERVAL)

    def _etcd_healthy(self) -> bool:
        connection = http.client.HTTPConnection(
            LOOPBACK, self._require_ports().etcd_client, timeout=PROBE_TIMEOUT
        )
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            body = response.read()
        except OSError:
            return False
        finally:
            connection.close()
        return response.status == HTTP_OK and json.loads(body).get("health") == "true"

    def _tls_context(self, *, client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki_dir / "serving-ca.crt"))
        if client_cert:
            context.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        return context

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        client_cert: bool,
        accept: str = "application/json",
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            self.address,
            self._require_ports().apiserver,
            timeout=PROBE_TIMEOUT,
            context=self._tls_context(client_cert=client_cert),
        )
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json", "Accept": accept}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _admin_request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        return self._request(method, path, body, client_cert=True)

    def _apiserver_ready(self) -> bool:
        try:
            status, _ = self._request("GET", "/readyz", None, client_cert=False)
        except (OSError, ssl.SSLError):
            return False
        return status == HTTP_OK

    def _default_namespace_exists(self) -> bool:
        try:
            status, _ = self._admin_request("GET", "/api/v1/namespaces/default")
        except (OSError, ssl.SSLError):
            return False
        return status == HTTP_OK

    def _stop_processes(self) -> None:
        errors = []
        for process in (self._apiserver, self._etcd):
            if process is None:
                continue
            try:
                process.terminate()
            except ControlPlaneError as err:
                errors.append(str(err))
        if errors:
            raise ControlPlaneError("; ".join(errors))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
