"""The drainer is supervised: a crash is logged, counted and restarted; a crash loop is unready.

The sidecar is assembled in process exactly as ``serve`` assembles it (its API server is a
closed port: nothing here needs one) and its pingback and admin applications run on real HTTP
servers. The fault is an unexpected exception (not a ``KubeError``) raised inside the drainer's
loop, where a bug in the replay path would raise it; readiness and the metrics are read over
HTTP, as the kubelet and Prometheus read them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from captchatask import kube, testbed
from captchatask.supervise import Supervisor
from captchatask_sidecar.server import Sidecar, assemble
from captchatask_sidecar.settings import load

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
#: A hang guard, never an assertion about speed.
PATIENCE_SECONDS = 60.0


class Fault:
    """An unexpected exception raised by the drainer while ``armed`` (``remaining`` times)."""

    def __init__(self, sidecar: Sidecar, *, times: int | None = None) -> None:
        self.spool = sidecar.spool
        self.remaining = times
        self.raised = 0
        self.calls_after = 0
        self._due = sidecar.spool.due

    async def due(self, now: float, limit: int) -> Any:
        if self.remaining is None or self.remaining > 0:
            if self.remaining is not None:
                self.remaining -= 1
            self.raised += 1
            raise RuntimeError("a bug in the replay path")
        self.calls_after += 1
        return await self._due(now, limit)

    def arm(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(self.spool, "due", self.due)


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


class Running:
    def __init__(self, sidecar: Sidecar, admin: TestClient[web.Request, web.Application]) -> None:
        self.sidecar = sidecar
        self.admin = admin

    async def sample(self, name: str, **labels: str) -> float | None:
        response = await self.admin.get("/metrics")
        for family in text_string_to_metric_families(await response.text()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    async def readyz(self) -> tuple[int, str]:
        response = await self.admin.get("/readyz")
        body = await response.json()
        return response.status, str(body.get("detail", body.get("status")))


@pytest.fixture
async def running(
    tmp_path: Path, key_file: Path, aiohttp_client: AiohttpClient
) -> AsyncIterator[Running]:
    (closed_port,) = testbed.free_ports(1)
    config = kube.KubeConfig(
        server=f"https://127.0.0.1:{closed_port}", verify=False, namespace="apps"
    )
    settings = load(
        [
            f"--pingback-key-file={key_file}",
            f"--spool-dir={tmp_path / 'spool'}",
            "--local-addr=",
            "--pod-name=supervision-test",
        ],
        {},
    )
    async with assemble(settings, registry=CollectorRegistry(), config=config) as sidecar:
        await aiohttp_client(sidecar.pingback_app)  # starts the (supervised) drainer
        admin = await aiohttp_client(sidecar.admin_app)
        yield Running(sidecar, admin)


async def test_a_drainer_crash_is_counted_and_the_drainer_restarts(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = Fault(running.sidecar, times=1)
    fault.arm(monkeypatch)
    running.sidecar.drainer.wake.set()

    async def restarted() -> bool:
        return fault.calls_after > 0

    await eventually(restarted, "the drainer to run again after its crash")
    assert fault.raised == 1
    assert await running.sample("captchatask_background_loop_crashes_total", loop="drainer") == 1
    # One crash is a restart, not an outage: still ready, still healthy.
    assert await running.readyz() == (200, "ready")
    assert await running.sample("captchatask_background_loop_healthy", loop="drainer") == 1


async def test_a_drainer_that_keeps_crashing_turns_the_receiver_unready_until_it_recovers(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await running.readyz() == (200, "ready")
    fault = Fault(running.sidecar)
    fault.arm(monkeypatch)
    running.sidecar.drainer.wake.set()

    async def unready() -> bool:
        return (await running.readyz())[0] == 503

    await eventually(unready, "readiness to turn false")
    _status, detail = await running.readyz()
    assert "the drainer keeps crashing" in detail
    crashes = await running.sample("captchatask_background_loop_crashes_total", loop="drainer")
    assert crashes is not None
    assert crashes >= 3
    assert await running.sample("captchatask_background_loop_healthy", loop="drainer") == 0

    # The bug goes away: after a restart that runs long enough (a minute in production; made
    # short here) the drainer is healthy and the receiver ready again.
    loop: Supervisor = running.sidecar.drain_loop
    loop.stable_after = 0.2
    fault.remaining = 0

    async def ready() -> bool:
        return await running.readyz() == (200, "ready")

    await eventually(ready, "readiness to come back")
    assert fault.calls_after > 0
    assert await running.sample("captchatask_background_loop_healthy", loop="drainer") == 1
