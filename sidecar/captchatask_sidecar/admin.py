"""The admin listener (``:9090``): ``/metrics``, ``/healthz``, ``/readyz``.

Its own application and runner, so a scrape never competes with pingbacks for a route and
pingback traffic never reaches the metrics. Readiness means "a pingback sent here now will be
acknowledged honestly": it turns false when the spool cannot be written (a full or read-only
volume; checked by a periodic probe and by every failed append), when the spool holds
``ready_fraction`` of its bound (before the bound, so the Service stops routing pingbacks here
while the requests already on their way still find room), while shutting down, and while a
supervised background loop keeps crashing (the drainer: acknowledged results would pile up
unreplayed), so the Service stops routing pingbacks to a receiver that could only answer ``503``
or could not deliver what it acknowledged.

Readiness is composable: each condition is a named reason with a check
(:meth:`Health.unready_when`), and ``/readyz`` lists the reasons that hold.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from captchatask.supervise import Supervisor
from captchatask_sidecar.errors import problem, problem_middleware
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.spool import Spool

#: How often the spool volume is probed while writable, and while it is not.
PROBE_INTERVAL_SECONDS: Final = 10.0
UNHEALTHY_PROBE_INTERVAL_SECONDS: Final = 1.0


@dataclass
class Health:
    """What readiness is computed from."""

    spool: Spool
    metrics: Metrics
    #: Unready once the spool's :meth:`~.spool.Spool.fill` reaches this (1.0: only when full).
    ready_fraction: float = 1.0
    shutting_down: bool = False
    reasons: list[str] = field(default_factory=list)
    #: Further named conditions: reason -> "unready now?" (see :meth:`unready_when`).
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def unready_when(self, reason: str, check: Callable[[], bool]) -> None:
        """Add a condition: the receiver is unready, saying ``reason``, while ``check()`` holds."""
        self.checks[reason] = check

    def ready(self) -> tuple[bool, list[str]]:
        """Whether the receiver can acknowledge pingbacks honestly, and if not, why."""
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if not self.spool.writable:
            reasons.append("the spool cannot be written")
        fill = self.spool.fill()
        if fill >= self.ready_fraction:
            reasons.append(f"the spool is {fill:.0%} full (unready from {self.ready_fraction:.0%})")
        self.metrics.spool_writable.set(1 if self.spool.writable else 0)
        reasons.extend(reason for reason, check in self.checks.items() if check())
        return not reasons, reasons

    def supervise(self, loop: str, run: Callable[[], Coroutine[Any, Any, None]]) -> Supervisor:
        """A supervised background loop, counted in the metrics, unready while it keeps crashing."""
        supervisor = Supervisor(name=loop, loop=run)
        supervisor.on_crash = self.metrics.track_loop(loop, healthy=lambda: supervisor.healthy)
        self.unready_when(f"the {loop} keeps crashing", lambda: not supervisor.healthy)
        return supervisor

    async def probe_forever(self) -> None:
        """Probe the spool volume periodically (a failed append also marks it unwritable)."""
        while True:
            await self.spool.probe()
            self.metrics.spool_writable.set(1 if self.spool.writable else 0)
            await asyncio.sleep(
                PROBE_INTERVAL_SECONDS if self.spool.writable else UNHEALTHY_PROBE_INTERVAL_SECONDS
            )


#: The application's :class:`Health`.
HEALTH: Final = web.AppKey("health", Health)


def _ok(data: dict[str, object]) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return _ok({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: see the module docstring."""
    ready, reasons = request.app[HEALTH].ready()
    if ready:
        return _ok({"status": "ready"})
    return problem(503, "; ".join(reasons), title="Not Ready")


def create_admin_app(
    *, registry: CollectorRegistry, health: Health, probe: bool = True
) -> web.Application:
    """Build the admin application.

    Parameters
    ----------
    registry
        The registry ``/metrics`` exposes.
    health
        Readiness inputs.
    probe
        Run the periodic spool probe with the app.
    """
    app = web.Application(middlewares=[problem_middleware])
    app[HEALTH] = health
    app.router.add_routes(
        [
            web.get("/metrics", make_aiohttp_handler(registry), allow_head=False),
            web.get("/healthz", healthz, allow_head=False),
            web.get("/readyz", readyz, allow_head=False),
        ]
    )
    if probe:
        prober = health.supervise("spool-probe", health.probe_forever)

        async def run_probe(_app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(prober.run(), name="spool-probe")
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.cleanup_ctx.append(run_probe)
    return app
