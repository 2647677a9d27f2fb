"""The operator's timer is supervised: a crash is logged, counted and restarted; a loop is unready.

The engine runs in process against the real API server (it lists tasks, providers and dead
letters when it activates) and its admin application on a real HTTP server. The fault is an
unexpected exception raised by the timer's poll flush, where a bug in the dispatch path would
raise it: before supervision it ended the timer, and with it every poll, deadline and TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from tests.operator.conftest import operator_engine

from captchatask import kube, testbed
from captchatask_operator import settings as settings_module
from captchatask_operator.admin import Health, create_app
from captchatask_operator.engine import Engine

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
#: A hang guard, never an assertion about speed.
PATIENCE_SECONDS = 60.0


@dataclass
class Running:
    engine: Engine
    registry: CollectorRegistry
    admin: TestClient[web.Request, web.Application]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def readyz(self) -> tuple[int, list[str]]:
        response = await self.admin.get("/readyz")
        return response.status, list((await response.json()).get("unready", []))


class Fault:
    """The timer's flush raises while ``remaining`` is positive (``None``: always)."""

    def __init__(self, engine: Engine, *, times: int | None) -> None:
        self.remaining = times
        self.raised = 0
        self.calls_after = 0
        self._flush = engine.timer._flush

    def flush(self, now: float) -> float | None:
        if self.remaining is None or self.remaining > 0:
            if self.remaining is not None:
                self.remaining -= 1
            self.raised += 1
            raise RuntimeError("a bug in the dispatch path")
        self.calls_after += 1
        return self._flush(now)


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def running(
    control_plane: testbed.ControlPlane, namespace: str, aiohttp_client: AiohttpClient
) -> AsyncIterator[Running]:
    config = kube.load_config(str(control_plane.kubeconfig))
    settings = settings_module.parse(["--namespace", namespace], {})
    registry = CollectorRegistry()
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        engine = operator_engine(client, session, settings, registry=registry)
        admin = await aiohttp_client(
            create_app(
                registry,
                Health(
                    started=lambda: True,
                    active=lambda: engine.active,
                    before_scrape=engine.refresh_gauges,
                    unready=engine.unhealthy_loops,
                ),
            )
        )
        yield Running(engine=engine, registry=registry, admin=admin)
        await engine.deactivate()


async def test_a_timer_crash_is_counted_and_the_timer_restarts(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = Fault(running.engine, times=1)
    monkeypatch.setattr(running.engine.timer, "_flush", fault.flush)
    await running.engine.activate()

    async def restarted() -> bool:
        return fault.calls_after > 0

    await eventually(restarted, "the timer to run again after its crash")
    crashes = "captchatask_operator_background_loop_crashes_total"
    assert running.sample(crashes, loop="timer") == 1
    assert await running.readyz() == (200, [])


async def test_a_timer_that_keeps_crashing_makes_the_operator_unready_until_it_recovers(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = Fault(running.engine, times=None)
    monkeypatch.setattr(running.engine.timer, "_flush", fault.flush)
    await running.engine.activate()

    async def unready() -> bool:
        return (await running.readyz())[0] == 503

    await eventually(unready, "readiness to turn false")
    assert (await running.readyz())[1] == ["the timer keeps crashing"]
    crashes = running.sample("captchatask_operator_background_loop_crashes_total", loop="timer")
    assert crashes is not None
    assert crashes >= 3
    assert running.sample("captchatask_operator_background_loop_healthy", loop="timer") == 0

    # The bug goes away: a restart that runs long enough (a minute in production; made short
    # here) makes the timer healthy and the operator ready again.
    running.engine.timer_loop.stable_after = 0.2
    fault.remaining = 0

    async def ready() -> bool:
        return await running.readyz() == (200, [])

    await eventually(ready, "readiness to come back")
    assert fault.calls_after > 0
    assert running.sample("captchatask_operator_background_loop_healthy", loop="timer") == 1
