"""The admin HTTP server: ``/metrics``, ``/healthz`` and ``/readyz`` on their own port.

Started in kopf's ``on.startup`` and stopped in ``on.cleanup`` (never at import time), on a port
separate from anything else. ``/readyz`` answers 200 once the operator has started; the body says
whether this replica is the active one or a standby (both are healthy members of the pair). It
answers 503, naming why, while a supervised background loop (the timer that runs every poll,
deadline and TTL) keeps crashing: the replica is up but does not do its job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

#: Seconds the runner waits for in-flight scrapes on shutdown.
SHUTDOWN_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class Health:
    """Callbacks the admin endpoints consult (kept as functions: no engine import here)."""

    started: Callable[[], bool]
    active: Callable[[], bool]
    before_scrape: Callable[[], None]
    #: Named reasons the replica is unready now (empty: none).
    unready: Callable[[], list[str]] = list


def create_app(registry: CollectorRegistry, health: Health) -> web.Application:
    """Return the admin application."""
    metrics_handler = make_aiohttp_handler(registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        health.before_scrape()
        return await metrics_handler(request)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        reasons = health.unready()
        state: dict[str, object] = {"started": health.started(), "active": health.active()}
        if reasons:
            state["unready"] = reasons
        body = json.dumps(state)
        status = 200 if health.started() and not reasons else 503
        return web.Response(text=body + "\n", status=status, content_type="application/json")

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", metrics),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
        ]
    )
    return app


class AdminServer:
    """One runner and one site for the admin app."""

    def __init__(self, app: web.Application, *, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self._host = host
        self._port = port

    async def start(self) -> int:
        """Bind and serve; return the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        addresses = self._runner.addresses
        return int(addresses[0][1]) if addresses else self._port

    async def stop(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()
