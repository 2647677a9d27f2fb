"""The whole system on one machine: control plane, emulator, sidecar and operator as processes.

``captchatask demo``, the chaos suite and the benchmarks all need the same thing a user's cluster
has — a real API server, a solver, a pingback receiver and the operator, each its own process
that can be killed and restarted — so they share this one orchestration. Every port is a free
loopback port; every process logs to ``<workdir>/logs/<name>.log``; :meth:`Stack.stop` leaves
nothing behind.

The solver is our emulator (the one thing we emulate); everything else is the production code,
started exactly as the Helm chart starts it, through the ``captchatask`` command.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from captchatask import testbed
from captchatask.testbed.processes import ManagedProcess

#: What the operator image (and the chart) set for the operator process: glibc arenas capped
#: at 2 (BENCH-4: less heap fragmentation), so benchmarks measure the production setting.
OPERATOR_IMAGE_ENV: Final = {"MALLOC_ARENA_MAX": "2"}
#: How long a component may take to answer its health endpoint after start.
READY_TIMEOUT: Final = 60.0
#: The API key the emulator accepts and the provider Secret holds (32 characters, like a real one).
API_KEY_LENGTH: Final = 32

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What to start; every list is extra command-line flags for that component."""

    workdir: Path
    namespace: str = "demo"
    seed: int = 1
    emulator_args: Sequence[str] = ()
    sidecar_args: Sequence[str] = ()
    operator_args: Sequence[str] = ()
    #: Overrides merged into the CaptchaProvider spec (polling policy, maxInFlight...).
    provider_spec: dict[str, Any] = field(default_factory=dict)
    #: False: the provider has no pingback URL (poll-only).
    pingbacks: bool = True


class Stack:
    """Start, fault and stop the whole system; use as a context manager."""

    def __init__(self, config: StackConfig, *, progress: Progress | None = None) -> None:
        self.config = config
        self.workdir = config.workdir
        self._say = progress or (lambda _message: None)
        self.plane = testbed.ControlPlane(self.workdir / "control-plane")
        self.api_key = secrets.token_hex(API_KEY_LENGTH // 2)
        self.key_file = self.workdir / "pingback.key"
        self.spool_dir = self.workdir / "spool"
        ports = testbed.free_ports(6)
        self.emulator_port, self.pingback_port, self.local_port = ports[:3]
        self.sidecar_admin_port, self.operator_admin_port = ports[3:5]
        self.processes: dict[str, ManagedProcess] = {}

    # -- URLs ------------------------------------------------------------------------------
    @property
    def emulator_url(self) -> str:
        """Base URL of the solver emulator (in.php, res.php and /_emulator/)."""
        return f"http://127.0.0.1:{self.emulator_port}"

    @property
    def pingback_url(self) -> str:
        """Public base URL of the pingback receiver."""
        return f"http://127.0.0.1:{self.pingback_port}"

    @property
    def local_api_url(self) -> str:
        """The sidecar's local task API."""
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def sidecar_metrics_url(self) -> str:
        """The sidecar's /metrics."""
        return f"http://127.0.0.1:{self.sidecar_admin_port}/metrics"

    @property
    def operator_metrics_url(self) -> str:
        """The operator's /metrics."""
        return f"http://127.0.0.1:{self.operator_admin_port}/metrics"

    def env(self) -> dict[str, str]:
        """Environment for kubectl and the components (KUBECONFIG, PATH with the binaries)."""
        return self.plane.env()

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # __exit__ does not run when __enter__ raises: stop what did start.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start everything and create the namespace, the key Secret and the provider."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._say("starting etcd + kube-apiserver")
        self.plane.start()
        self.plane.install_crds(testbed.default_crd_documents())
        self.key_file.write_text(secrets.token_urlsafe(36) + "\n", encoding="utf-8")
        self.key_file.chmod(0o600)
        self.plane.kubectl("create", "namespace", self.config.namespace)
        self.start_component("emulator")
        self.apply(self.provider_manifests())
        self.start_component("sidecar")
        self.start_component("operator")

    def stop(self) -> None:
        """Stop every component, then the control plane; idempotent."""
        for name in ("operator", "sidecar", "emulator"):
            process = self.processes.pop(name, None)
            if process is not None:
                with contextlib.suppress(testbed.ControlPlaneError):
                    process.terminate()
        self.plane.stop()

    def argv(self, name: str) -> list[str]:
        """The command line of a component, as the chart would run it."""
        cfg = self.config
        base = [sys.executable, "-m", "captchatask", name]
        if name == "emulator":
            return [
                *base,
                "--port", str(self.emulator_port),
                "--seed", str(cfg.seed),
                "--key", self.api_key,
                *cfg.emulator_args,
            ]  # fmt: skip
        if name == "sidecar":
            return [
                *base,
                "--pingback-addr", f"127.0.0.1:{self.pingback_port}",
                "--local-addr", f"127.0.0.1:{self.local_port}",
                "--admin-addr", f"127.0.0.1:{self.sidecar_admin_port}",
                "--namespace", cfg.namespace,
                "--pingback-key-file", str(self.key_file),
                "--spool-dir", str(self.spool_dir),
                "--pod-name", "sidecar-0",
                "--kubeconfig", str(self.plane.kubeconfig),
                *cfg.sidecar_args,
            ]  # fmt: skip
        if name == "operator":
            return [
                *base,
                "--namespace", cfg.namespace,
                "--standalone",
                "--admin-host", "127.0.0.1",
                "--admin-port", str(self.operator_admin_port),
                "--pingback-key-file", str(self.key_file),
                *cfg.operator_args,
            ]  # fmt: skip
        raise ValueError(f"unknown component {name!r}")

    def health_url(self, name: str) -> str:
        """The URL that answers 200 once the component is up."""
        return {
            "emulator": f"{self.emulator_url}/_emulator/healthz",
            "sidecar": f"http://127.0.0.1:{self.sidecar_admin_port}/healthz",
            "operator": f"http://127.0.0.1:{self.operator_admin_port}/healthz",
        }[name]

    def start_component(self, name: str) -> None:
        """Start (or restart) one component and wait until it is healthy."""
        self._say(f"starting {name}")
        process = ManagedProcess.launch(
            name=name,
            argv=self.argv(name),
            log=self.workdir / "logs" / f"{name}.log",
            marker=str(self.workdir),
            # The components find the API server through KUBECONFIG, as in a pod they would
            # through the service-account mount; the operator gets its image's environment.
            env=self.env() | (OPERATOR_IMAGE_ENV if name == "operator" else {}),
        )
        self.processes[name] = process
        self._wait_healthy(name, process)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal one component (SIGKILL by default: a crash, not a shutdown) and reap it."""
        process = self.processes.pop(name)
        process.signal(sig)
        with contextlib.suppress(testbed.ControlPlaneError):
            process.terminate(timeout=10.0)

    def restart(self, name: str) -> None:
        """Kill a component with SIGKILL and start it again."""
        self.kill(name)
        self.start_component(name)

    def _wait_healthy(self, name: str, process: ManagedProcess) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        url = self.health_url(name)
        while True:
            if not process.alive():
                raise testbed.ControlPlaneError(f"{name} exited at start\n{process.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as reply,  # noqa: S310 - loopback
            ):
                if reply.status == 200:
                    return
            if time.monotonic() > deadline:
                raise testbed.ControlPlaneError(f"{name} not healthy\n{process.log_tail()}")
            time.sleep(0.1)

    # -- objects ---------------------------------------------------------------------------
    def provider_manifests(self) -> list[dict[str, Any]]:
        """The API-key Secret and the ``default`` CaptchaProvider pointing at the emulator."""
        spec: dict[str, Any] = {
            "dialect": "captchaai",
            "baseURL": self.emulator_url,
            "apiKeySecretRef": {"name": "solver-key"},
            **self.config.provider_spec,
        }
        if self.config.pingbacks:
            spec["pingback"] = {"publicURL": self.pingback_url}
        return [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "solver-key"},
                "stringData": {"apiKey": self.api_key},
            },
            {
                "apiVersion": "captchatask.dev/v1alpha1",
                "kind": "CaptchaProvider",
                "metadata": {"name": "default"},
                "spec": spec,
            },
        ]

    def apply(self, documents: Sequence[dict[str, Any]]) -> None:
        """``kubectl apply`` documents into the stack's namespace."""
        self.plane.kubectl(
            "apply",
            "-n",
            self.config.namespace,
            "-f",
            "-",
            input="\n".join(json.dumps(doc) for doc in documents),
        )

    def get_json(self, *args: str) -> Any:
        """``kubectl get ... -o json`` in the stack's namespace, decoded."""
        out = self.plane.kubectl("get", "-n", self.config.namespace, *args, "-o", "json").stdout
        return json.loads(out)

    def emulator(self, path: str, body: object | None = None) -> Any:
        """GET (or POST ``body`` to) the emulator's admin API under ``/_emulator/``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback only
            f"{self.emulator_url}/_emulator/{path}",
            data=data,
            headers={"Content-Type": "application/json"},
            method="POST" if data is not None else "GET",
        )
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            return json.loads(reply.read())

    def logs(self) -> Iterator[Path]:
        """Every log file the stack wrote."""
        yield from sorted((self.workdir / "logs").glob("*.log"))
        yield from sorted(self.plane.logs_dir.glob("*.log"))
