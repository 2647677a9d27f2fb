"""Fixtures for the sidecar tests: real sidecar processes, a real API client, signed URLs.

``sidecar`` starts ``python -m captchatask_sidecar`` as a subprocess (the real entry point) on
free loopback ports and stops it at teardown; ``cluster`` is a small typed helper over the real
API server (tasks in ``Submitted`` are made with ``Ledger.update_status``, as the operator
would). Helpers are fixtures because test modules are imported with ``--import-mode=importlib``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from captchatask import kube, model, signing, testbed
from captchatask.decision import set_condition
from captchatask.ledger import Ledger, utcnow
from captchatask.model import TaskRef, TaskView

#: How long a test waits for something that should happen "within seconds" (a hang guard,
#: never an assertion about speed).
PATIENCE_SECONDS = 60.0


def make_key_file(directory: Path) -> Path:
    path = directory / "pingback.key"
    path.write_text(secrets.token_urlsafe(48) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return make_key_file(tmp_path)


@pytest.fixture
def signer(key_file: Path) -> signing.PingbackSigner:
    return signing.PingbackSigner(signing.load_keys(key_file))


def unreachable_kubeconfig(directory: Path) -> Path:
    """A kubeconfig whose API server port is closed: any API call fails at once."""
    (port,) = testbed.free_ports(1)
    path = directory / "unreachable.kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}
users:
- name: nobody
  user: {{token: not-a-token}}
contexts:
- name: nowhere
  context: {{cluster: nowhere, user: nobody, namespace: default}}
current-context: nowhere
""",
        encoding="utf-8",
    )
    return path


@dataclass
class SidecarProcess:
    """One ``captchatask sidecar`` subprocess."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    pingback_port: int
    local_port: int
    admin_port: int
    spool_dir: Path
    preexec: Callable[[], None] | None = None
    process: subprocess.Popen[bytes] | None = None
    _log_handle: Any = None

    @property
    def pingback_url(self) -> str:
        return f"http://127.0.0.1:{self.pingback_port}"

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> SidecarProcess:
        self._log_handle = self.log.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec,  # noqa: PLW1509 - only resource limits, set before exec
        )
        deadline = time.monotonic() + PATIENCE_SECONDS
        while "sidecar ready" not in self.log_text():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"sidecar exited {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar did not start:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=PATIENCE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    async def metrics(
        self, session: aiohttp.ClientSession
    ) -> dict[tuple[str, tuple[str, ...]], float]:
        """Scrape /metrics into ``{(sample name, label values but the namespace): value}``.

        Series of every namespace are summed: these tests serve one namespace each, and the
        namespace label has tests of its own.
        """
        async with session.get(self.admin_url + "/metrics") as response:
            text = await response.text()
        samples: dict[tuple[str, tuple[str, ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values = tuple(v for k, v in sample.labels.items() if k != "namespace")
                key = (sample.name, values)
                samples[key] = samples.get(key, 0.0) + sample.value
        return samples


SidecarFactory = Callable[..., SidecarProcess]


@pytest.fixture
def sidecar(tmp_path: Path, key_file: Path) -> Iterator[SidecarFactory]:
    """Start sidecar subprocesses: ``sidecar(kubeconfig=..., namespace=..., **flags)``."""
    started: list[SidecarProcess] = []

    def start(
        *,
        kubeconfig: Path,
        namespace: str,
        spool_dir: Path | None = None,
        ports: Sequence[int] | None = None,
        flags: Mapping[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
        run: bool = True,
    ) -> SidecarProcess:
        pingback, local, admin = ports or testbed.free_ports(3)
        spool = spool_dir or tmp_path / "spool"
        argv = [
            sys.executable,
            "-m",
            "captchatask_sidecar",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={namespace}",
            f"--pingback-key-file={key_file}",
            f"--spool-dir={spool}",
            f"--pingback-addr=127.0.0.1:{pingback}",
            f"--local-addr=127.0.0.1:{local}",
            f"--admin-addr=127.0.0.1:{admin}",
            f"--pod-name=sidecar-test-{len(started)}",
        ]
        argv += [f"--{name}={value}" for name, value in (flags or {}).items()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTCHATASK_")}
        process = SidecarProcess(
            argv=argv,
            env=env,
            log=tmp_path / f"sidecar-{len(started)}.log",
            pingback_port=pingback,
            local_port=local,
            admin_port=admin,
            spool_dir=spool,
            preexec=preexec,
        )
        started.append(process)
        return process.start() if run else process

    yield start
    for process in started:
        if process.process is not None:
            process.stop()


@dataclass
class Cluster:
    """Typed helpers over the real API server (the test's own client)."""

    ledger: Ledger
    kubeconfig: Path
    _names: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))

    @property
    def client(self) -> kube.KubeClient:
        return self.ledger.client

    def name(self, prefix: str = "t") -> str:
        return f"{prefix}-{next(self._names)}"

    async def create_task(self, namespace: str, name: str, **spec: Any) -> TaskView:
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.TASK_KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "Turnstile", "siteKey": "k", "pageURL": "https://a.example/", **spec},
        }
        return TaskView.from_body(await self.client.create(kube.TASKS, namespace, body))

    async def submitted(self, namespace: str, name: str, provider_task_id: str) -> TaskView:
        """A task as the operator leaves it after ``in.php`` accepted it."""
        task = await self.create_task(namespace, name)
        now = utcnow()
        fields = {
            "phase": "Submitted",
            "providerTaskId": provider_task_id,
            "submittedAt": model.format_time(now),
            "conditions": set_condition(
                [],
                type_="Submitted",
                status="True",
                reason="Accepted",
                message="accepted",
                generation=task.generation,
                now=now,
            ),
        }
        updated = await self.ledger.update_status(task, fields)
        assert updated is not None
        return updated

    async def failed_by_operator(
        self, namespace: str, name: str, provider_task_id: str
    ) -> TaskView:
        """A submitted task the operator then failed itself (``DeadlineExceeded``), now."""
        task = await self.submitted(namespace, name, provider_task_id)
        now = utcnow()
        failed = await self.ledger.update_status(
            task,
            {
                "phase": "Failed",
                "finishedAt": model.format_time(now),
                "failure": {"code": "DeadlineExceeded", "message": "no result before the deadline"},
            },
        )
        assert failed is not None
        return failed

    async def many_submitted(
        self, namespace: str, count: int, *, prefix: str = "m", concurrency: int = 32
    ) -> list[TaskView]:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> TaskView:
            async with gate:
                return await self.submitted(namespace, f"{prefix}-{index}", str(10_000 + index))

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def task(self, namespace: str, name: str) -> TaskView | None:
        return await self.ledger.get_task(namespace, name)

    async def dead_letters(self, namespace: str) -> list[dict[str, Any]]:
        listing = await self.client.list(kube.DEAD_LETTERS, namespace)
        return list(listing.get("items") or [])

    async def wait_for(
        self, predicate: Callable[[], Any], *, what: str, patience: float = PATIENCE_SECONDS
    ) -> Any:
        """Poll an async predicate until it returns something truthy (a hang guard)."""
        deadline = time.monotonic() + patience
        while True:
            value = await predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(control_plane: testbed.ControlPlane) -> AsyncIterator[Cluster]:
    config = kube.load_config(str(control_plane.kubeconfig))
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        yield Cluster(
            ledger=Ledger(kube.KubeClient(config, session)), kubeconfig=control_plane.kubeconfig
        )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=PATIENCE_SECONDS)
    ) as session:
        yield session


@contextlib.contextmanager
def paused(plane: testbed.ControlPlane) -> Iterator[None]:
    """SIGSTOP the API server for the block; always SIGCONT it again."""
    plane.pause()
    try:
        yield
    finally:
        plane.resume()


@pytest.fixture
def pause_apiserver(
    control_plane: testbed.ControlPlane,
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    return lambda: paused(control_plane)


@pytest.fixture
def url_for(signer: signing.PingbackSigner) -> Callable[[str, TaskRef], str]:
    """The signed pingback URL of a task under a receiver's base URL."""
    return signer.url


@pytest.fixture
def unreachable(tmp_path: Path) -> Path:
    """A kubeconfig pointing at a closed port (proves "no API call": any call would fail)."""
    return unreachable_kubeconfig(tmp_path)
