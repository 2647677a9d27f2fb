"""Fixtures for the operator's real-control-plane tests.

The operator runs as a subprocess (``python -m captchatask_operator``, exactly what the
``captchatask operator`` console script runs) against the session's kube-apiserver. The solver
is the in-process emulator on 127.0.0.1, and pingbacks go to a tiny in-process receiver that
verifies the signed path and records through the shared ledger, like the real sidecar does.
Helpers are exposed as fixtures (``harness``) because test modules cannot import each other
under ``--import-mode=importlib``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from captchatask import kube, model, testbed
from captchatask.decision import Result
from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.events import EventRecorder
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy, TaskRef
from captchatask.signing import PingbackSigner, parse_path_parts
from captchatask_operator.engine import Engine, utcnow
from captchatask_operator.metrics import Metrics
from captchatask_operator.settings import Settings

PEERING_CRD = Path(__file__).parents[2] / "operator" / "captchatask_operator" / "peering-crd.yaml"
#: Generous upper bound for any wait in these tests (a bound on failure, not a timing assertion).
WAIT_SECONDS = 45.0


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float = WAIT_SECONDS, what: str = ""
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.2)


@dataclass
class Receiver:
    """The test's pingback receiver: verify, then ``ledger.record``."""

    base_url: str
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class OperatorProcess:
    """One operator subprocess."""

    process: subprocess.Popen[bytes]
    admin_port: int
    log: Path

    def metrics_text(self) -> str:
        import urllib.request  # noqa: PLC0415

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())

    def ready(self) -> dict[str, Any] | None:
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2
            ) as response:
                return dict(json.loads(response.read()))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Harness:
    """Cluster, emulator and operator helpers for one test."""

    namespace: str
    client: kube.KubeClient
    ledger: Ledger
    signer: PingbackSigner
    key_file: Path
    env: dict[str, str]
    tmp: Path
    kubectl: testbed.Kubectl
    operators: list[OperatorProcess] = field(default_factory=list)

    @staticmethod
    async def wait_until(
        predicate: Callable[[], Awaitable[bool]], *, timeout: float = WAIT_SECONDS, what: str = ""
    ) -> None:
        await wait_until(predicate, timeout=timeout, what=what)

    # -- objects ---------------------------------------------------------------------------

    async def secret(self, name: str = "solver", api_key: str = DEFAULT_API_KEY) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": self.namespace},
            "data": {"apiKey": base64.b64encode(api_key.encode()).decode()},
        }
        try:
            await self.client.create(kube.SECRETS, self.namespace, body)
        except kube.ApiError as exc:
            if exc.status != 409:
                raise
            await self.client.patch(kube.SECRETS, self.namespace, name, {"data": body["data"]})

    async def provider(
        self,
        emulator: RunningEmulator,
        *,
        name: str = "default",
        public_url: str | None = None,
        callback_timeout: int = 2,
        interval: int = 5,
        max_polls: int = 20,
        max_in_flight: int | None = None,
        dialect: str = "captchaai",
    ) -> None:
        spec: dict[str, Any] = {
            "dialect": dialect,
            "baseURL": emulator.base_url,
            "apiKeySecretRef": {"name": "solver"},
            "polling": {
                "callbackTimeoutSeconds": callback_timeout,
                "intervalSeconds": interval,
                "maxPolls": max_polls,
            },
        }
        if public_url:
            spec["pingback"] = {"publicURL": public_url}
        if max_in_flight is not None:
            spec["maxInFlight"] = max_in_flight
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.PROVIDER_KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        await self.client.create(kube.PROVIDERS, self.namespace, body)

    async def tasks(self, count: int, *, prefix: str = "t", **spec: Any) -> list[str]:
        names = [f"{prefix}{i:03d}" for i in range(count)]
        await asyncio.gather(*(self.task(name, **spec) for name in names))
        return names

    async def task(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.TASK_KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "type": "RecaptchaV2",
                "siteKey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",
                "pageURL": "https://example.com/login",
                **spec,
            },
        }
        return await self.client.create(kube.TASKS, self.namespace, body)

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.client.get(kube.TASKS, self.namespace, name)
        except kube.ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def all_tasks(self) -> list[dict[str, Any]]:
        listed = await self.client.list(kube.TASKS, self.namespace)
        return list(listed.get("items") or [])

    async def phases(self) -> Counter[str]:
        return Counter(
            str((t.get("status") or {}).get("phase", "")) for t in await self.all_tasks()
        )

    async def wait_terminal(
        self, count: int, *, timeout: float = WAIT_SECONDS
    ) -> list[dict[str, Any]]:
        async def done() -> bool:
            phases = await self.phases()
            return phases["Solved"] + phases["Failed"] >= count

        await wait_until(done, timeout=timeout, what=f"{count} tasks to finish")
        return await self.all_tasks()

    async def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        listed = await self.client.list(kube.EVENTS, self.namespace)
        items = list(listed.get("items") or [])
        return [e for e in items if reason is None or e.get("reason") == reason]

    # -- operator ---------------------------------------------------------------------------

    def start_operator(self, *extra: str, peering: str | None = None) -> OperatorProcess:
        admin_port = testbed.free_ports(1)[0]
        log = self.tmp / f"operator-{len(self.operators)}.log"
        argv = [
            sys.executable,
            "-m",
            "captchatask_operator",
            "--namespace",
            self.namespace,
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(admin_port),
            "--pingback-key-file",
            str(self.key_file),
            "--watch-server-timeout",
            "10",
            "--provider-retry-seconds",
            "1",
            "--poll-batch-window",
            "0.05",
            *(["--peering", peering] if peering else ["--standalone"]),
            *extra,
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(argv, env=self.env, stdout=sink, stderr=subprocess.STDOUT)
        operator = OperatorProcess(process, admin_port, log)
        self.operators.append(operator)
        return operator

    async def started(self, operator: OperatorProcess, *, active: bool | None = True) -> None:
        async def check() -> bool:
            if operator.process.poll() is not None:
                pytest.fail(f"operator exited:\n{operator.output()[-4000:]}")
            ready = operator.ready()
            if not ready or not ready.get("started"):
                return False
            return active is None or ready.get("active") is active

        await wait_until(check, timeout=30, what="the operator to start")

    @staticmethod
    def per_uid(emulator: RunningEmulator) -> Counter[str]:
        """Provider tasks the emulator created per CaptchaTask uid (from the signed URL)."""
        counts: Counter[str] = Counter()
        for task in emulator.tasks():
            if task.pingback_url:
                counts[task.pingback_url.split("/")[-2]] += 1
        return counts

    async def set_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Write a task's status directly (to stage a crash the operator must recover from)."""
        return await self.client.patch(
            kube.TASKS, self.namespace, name, {"status": status}, subresource="status"
        )

    def stop_all(self) -> None:
        for operator in self.operators:
            operator.stop()


@pytest.fixture(scope="session")
def peering_crds(control_plane: testbed.ControlPlane) -> None:
    """Install kopf's peering CRDs once (only the standby test needs them)."""
    control_plane.kubectl("apply", "-f", str(PEERING_CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=30s"
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "pingback-key"
    path.write_text(secrets.token_urlsafe(48) + "\n")
    return path


@pytest.fixture
async def harness(
    control_plane: testbed.ControlPlane,
    namespace: str,
    key_file: Path,
    tmp_path: Path,
) -> AsyncIterator[Harness]:
    from captchatask.signing import load_keys  # noqa: PLC0415

    config = kube.load_config(str(control_plane.kubeconfig))
    env = control_plane.env()
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("CAPTCHATASK_NAMESPACES", None)
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        h = Harness(
            namespace=namespace,
            client=client,
            ledger=Ledger(client),
            signer=PingbackSigner(load_keys(key_file)),
            key_file=key_file,
            env=env,
            tmp=tmp_path,
            kubectl=control_plane.kubectl,
        )
        try:
            yield h
        finally:
            h.stop_all()
            for operator in h.operators:
                sys.stderr.write(f"--- operator log tail ---\n{operator.output()[-3000:]}\n")


@pytest.fixture
async def receiver(harness: Harness) -> AsyncIterator[Receiver]:
    """A pingback receiver on 127.0.0.1 that records through the ledger."""
    state = Receiver(base_url="")

    async def pingback(request: web.Request) -> web.Response:
        info = request.match_info
        parsed = parse_path_parts(info["ns"], info["name"], info["uid"], info["token"])
        if parsed is None or not harness.signer.verify(parsed.ref, parsed.token):
            state.outcomes["forged"] += 1
            return web.Response(status=403)
        form = await request.post() if request.method == "POST" else {}
        task_id = request.query.get("id") or str(form.get("id", ""))
        code = request.query.get("code") or str(form.get("code", ""))
        if code.startswith("ERROR_"):
            result = Result.failed(
                code=code,
                message="reported by pingback",
                delivered_by=DeliveredBy.PINGBACK,
                provider_task_id=task_id or None,
            )
        else:
            result = Result.solved(
                token=code, delivered_by=DeliveredBy.PINGBACK, provider_task_id=task_id or None
            )
        recorded = await harness.ledger.record(parsed.ref, result)
        state.outcomes[str(recorded.outcome)] += 1
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_route("*", "/v1/pingback/{ns}/{name}/{uid}/{token}", pingback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    """Fast solves (about 0.5-1.5 s for reCAPTCHA v2) and a deterministic seed."""
    return EmulatorConfig(seed=7, threads=200, solve_time_scale=0.025)


@pytest.fixture
async def emulator(emulator_config: EmulatorConfig) -> AsyncIterator[RunningEmulator]:
    async with run_emulator(emulator_config) as running:
        yield running


def operator_engine(
    client: kube.KubeClient,
    session: aiohttp.ClientSession,
    settings: Settings,
    *,
    clock: Callable[[], dt.datetime] | None = None,
    registry: CollectorRegistry | None = None,
) -> Engine:
    """An engine wired as the operator wires it, in-process, with Events not posted.

    The tests read the ledger and the metrics, not Events; ``clock`` drives both the engine and
    its ledger (a fake one for schedules), ``registry`` lets a test read the metrics.
    """
    events_clock = clock or utcnow
    return Engine(
        client=client,
        http=session,
        signer=None,
        settings=settings,
        metrics=Metrics(registry or CollectorRegistry()),
        events=EventRecorder(
            client, component="test", instance="test", clock=events_clock, enabled=False
        ),
        clock=events_clock,
    )


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A real HTTP server on loopback that sends every request to ``handler``; its base URL.

    For the proxies tests put between the operator and the emulator (to hold, fail or watch
    provider calls on the wire).
    """
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


#: The account-check actions a test proxy tells apart (CaptchaAI: ``threadsinfo``; 2captcha:
#: ``getbalance``).
CHECK_ACTIONS = frozenset({"threadsinfo", "getbalance"})


async def forward(
    session: aiohttp.ClientSession, upstream: str, request: web.Request, body: bytes
) -> web.Response:
    """Send a request a test proxy took (its ``body`` already read) on to ``upstream``."""
    headers = {"Content-Type": request.headers.get("Content-Type", "")}
    async with session.request(
        request.method, upstream + request.path_qs, data=body, headers=headers
    ) as response:
        payload = await response.read()
        content_type = response.headers.get("Content-Type", "text/plain")
        return web.Response(
            status=response.status, body=payload, headers={"Content-Type": content_type}
        )


def ref_of(body: dict[str, Any]) -> TaskRef:
    meta = body["metadata"]
    return TaskRef(meta["namespace"], meta["name"], meta["uid"])


@pytest.fixture(autouse=True)
def _no_proxy_env() -> Iterator[None]:
    """Keep every request of the test process on loopback, whatever the host environment says."""
    saved = {
        k: os.environ.pop(k)
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
        if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)
