"""Assemble the sidecar and run its three listeners until told to stop.

Startup: load the kube config (once), fill in the namespace, load the pingback keys, open the
spool (replaying what a previous run left), then start three applications, each on its own
``AppRunner``: pingbacks, the local task API (unless disabled) and admin.

Shutdown (SIGTERM/SIGINT): readiness turns false at once; the pingback and local listeners stop
accepting and their in-flight requests get ``shutdown_timeout_seconds`` to finish (each of them
is acknowledged only once durable, so a drained request is a kept result); the drainer and the
watch stop with their apps; the spool flushes and closes (unresolved records stay on disk for
the next start); the admin listener goes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from captchatask import kube, signing
from captchatask.ledger import Ledger
from captchatask.provider import codes
from captchatask.supervise import Supervisor
from captchatask_sidecar.accesslog import RedactingAccessLogger
from captchatask_sidecar.admin import Health, create_admin_app
from captchatask_sidecar.drainer import Drainer
from captchatask_sidecar.limiter import GradientLimit, LedgerGate, LimitSettings
from captchatask_sidecar.local_api import LocalApi, create_local_app
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.pace import WritePace
from captchatask_sidecar.pingback import PingbackReceiver, create_pingback_app
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.settings import Address, Settings
from captchatask_sidecar.spool import Spool
from captchatask_sidecar.verify import Verifier
from captchatask_sidecar.watch import TaskHub

logger = logging.getLogger(__name__)

#: API-server connections: the ledger path keeps this many PATCHes in flight at most.
KUBE_CONNECTIONS: Final = 128
#: Pingback ledger writes in flight before the adaptive limit has measured anything: a few, since
#: a few already saturate a measured kube-apiserver; it grows from there if the API server keeps
#: answering at its unloaded speed.
INITIAL_LEDGER_IN_FLIGHT: Final = 4


def ledger_gate(settings: Settings) -> LedgerGate:
    """The pingback path's write-now-or-spool decision, configured from the settings."""
    minimum, maximum = settings.ledger_min_in_flight, settings.ledger_max_in_flight
    limit = GradientLimit(
        LimitSettings(
            initial=min(maximum, max(minimum, INITIAL_LEDGER_IN_FLIGHT)),
            minimum=minimum,
            maximum=maximum,
            tolerance=settings.ledger_latency_tolerance,
        ),
        clock=time.monotonic,
    )
    pace = None
    if settings.ledger_writes_per_second > 0:
        pace = WritePace(
            settings.ledger_writes_per_second, settings.ledger_writes_burst, clock=time.monotonic
        )
    return LedgerGate(limit, pace)


@dataclass
class Sidecar:
    """The running components (for in-process tests and the CLI)."""

    settings: Settings
    metrics: Metrics
    spool: Spool
    recorder: Recorder
    drainer: Drainer
    #: The drainer's supervisor (crashes, restarts, health).
    drain_loop: Supervisor
    health: Health
    pingback_app: web.Application
    local_app: web.Application | None
    admin_app: web.Application


@contextlib.asynccontextmanager
async def assemble(
    settings: Settings, *, registry: CollectorRegistry, config: kube.KubeConfig
) -> AsyncIterator[Sidecar]:
    """Open every shared resource and build the three applications; close them on exit."""
    settings = settings.with_namespace(config.namespace)
    signer = signing.PingbackSigner(signing.load_keys(settings.pingback_key_file))
    metrics = Metrics(registry)
    spool = Spool(
        settings.spool_dir,
        max_bytes=settings.spool_max_bytes,
        max_records=settings.spool_max_records,
        on_damage=metrics.spool_damaged,
    )
    await asyncio.to_thread(spool.open)
    metrics.track_spool(depth=lambda: float(spool.depth), oldest_age=spool.oldest_age)
    metrics.track_spool_bound(
        held_bytes=lambda: float(spool.held_bytes),
        max_bytes=spool.max_bytes,
        max_records=spool.max_records,
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(spool.close)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=kube.connector(config, limit=KUBE_CONNECTIONS))
        )
        client = kube.KubeClient(config, session)
        hub = TaskHub(client, settings.pod_namespace, metrics)
        gate = ledger_gate(settings)
        metrics.track_ledger(
            limit=lambda: gate.limit.limit,
            pingback_in_flight=lambda: float(gate.limit.in_flight),
            replay_in_flight=lambda: float(gate.replaying),
        )
        recorder = Recorder(
            # The hot path retries a "come back later" only within its budget, then spools.
            ledger=Ledger(
                client.with_retry(budget=settings.ledger_budget_seconds),
                timeout=settings.ledger_budget_seconds,
            ),
            spool=spool,
            metrics=metrics,
            budget=settings.ledger_budget_seconds,
            received_by=settings.pod_name,
            publish=hub.publish,
            gate=gate,
        )
        drainer = Drainer(
            recorder=recorder,
            ledger=Ledger(client, timeout=settings.drain_timeout_seconds),
            spool=spool,
            metrics=metrics,
            concurrency=settings.drain_concurrency,
        )
        spool.on_append = drainer.wake.set
        verifier = None
        if settings.verify_by_poll:
            provider_session = await stack.enter_async_context(aiohttp.ClientSession())
            verifier = Verifier(
                kube_client=client, session=provider_session, provider=settings.provider
            )
        metrics.serve(settings.pingback_namespaces)
        receiver = PingbackReceiver(
            namespaces=frozenset(settings.pingback_namespaces),
            signer=signer,
            recorder=recorder,
            metrics=metrics,
            dialect=codes.Dialect(settings.dialect),
            max_body_bytes=settings.max_body_bytes,
            read_timeout=settings.read_timeout_seconds,
            verifier=verifier,
        )
        local_app = None
        if settings.local_addr is not None:
            local_app = create_local_app(
                LocalApi(
                    client=client,
                    ledger=Ledger(client),
                    hub=hub,
                    signer=signer,
                    metrics=metrics,
                    namespace=settings.pod_namespace,
                    provider=settings.provider,
                    public_url=settings.public_url,
                    created_by=settings.pod_name,
                    max_wait=settings.max_wait_seconds,
                    max_body_bytes=settings.local_max_body_bytes,
                    read_timeout=settings.read_timeout_seconds,
                ),
                max_body_bytes=settings.local_max_body_bytes,
            )
        health = Health(spool=spool, metrics=metrics)
        ready_fraction = settings.spool_ready_fraction
        health.unready_when(
            f"the spool holds {ready_fraction:.0%} of its bound or more",
            lambda: spool.fill() >= ready_fraction,
        )
        drain_loop = health.supervise("drainer", drainer.run)
        yield Sidecar(
            settings=settings,
            metrics=metrics,
            spool=spool,
            recorder=recorder,
            drainer=drainer,
            drain_loop=drain_loop,
            health=health,
            pingback_app=create_pingback_app(receiver, drainer=drain_loop),
            local_app=local_app,
            admin_app=create_admin_app(registry=registry, health=health),
        )


async def _start(
    app: web.Application, address: Address, *, settings: Settings, keepalive: float
) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("captchatask_sidecar.access") if settings.access_log else None,
        # Never aiohttp's own format: the request line carries the path token and solutions.
        access_log_class=RedactingAccessLogger,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        keepalive_timeout=keepalive,
        # A GET pingback carries its token in the query: allow a full-size token on the line.
        max_line_size=max(8190, settings.max_body_bytes),
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    await site.start()
    return runner


async def serve(
    settings: Settings,
    *,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    config: kube.KubeConfig | None = None,
) -> None:
    """Run the sidecar until ``stop`` is set, then shut down gracefully."""
    if config is None:
        config = await asyncio.to_thread(kube.load_config, settings.kubeconfig)
    async with assemble(settings, registry=registry, config=config) as sidecar:
        settings = sidecar.settings
        runners: list[web.AppRunner] = []
        admin: web.AppRunner | None = None
        try:
            admin = await _start(
                sidecar.admin_app,
                settings.admin_addr,
                settings=settings,
                keepalive=settings.read_timeout_seconds,
            )
            pingback = await _start(
                sidecar.pingback_app,
                settings.pingback_addr,
                settings=settings,
                keepalive=settings.read_timeout_seconds,
            )
            runners = [pingback]
            if sidecar.local_app is not None and settings.local_addr is not None:
                runners.append(
                    await _start(
                        sidecar.local_app,
                        settings.local_addr,
                        settings=settings,
                        # A long-poll is a request in flight, which keep-alive does not cut; the
                        # keep-alive bound is what ends half-sent headers (slow-loris).
                        keepalive=settings.read_timeout_seconds,
                    )
                )
            # Everything built so far (modules, clients, apps) lives as long as the process: move
            # it out of the garbage collector's generations, so a full collection (they happen
            # every second or so under load) walks only what was allocated since, not the whole
            # interpreter heap (measured: ~40 ms pauses that stalled every in-flight pingback).
            gc.freeze()
            logger.info(
                "sidecar ready: pingbacks on %s (namespaces %s), local API on %s, admin on %s; "
                "%d spooled results pending",
                settings.pingback_addr,
                ",".join(settings.pingback_namespaces),
                settings.local_addr or "-",
                settings.admin_addr,
                sidecar.spool.depth,
            )
            await stop.wait()
            logger.info("shutting down: draining in-flight requests")
            sidecar.health.shutting_down = True
        finally:
            await asyncio.gather(*(runner.cleanup() for runner in runners))
            await sidecar.spool.close()
            if sidecar.spool.depth:
                logger.warning(
                    "%d acknowledged results stay in the spool for the next start",
                    sidecar.spool.depth,
                )
            if admin is not None:
                await admin.cleanup()
        logger.info("sidecar stopped")
