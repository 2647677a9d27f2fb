"""kopf wiring: thin handlers that feed the engine, and the runtime they share.

Handlers are registered on an explicit :class:`kopf.OperatorRegistry` built by
:func:`build_registry` (no import-time registration): importing this module has no side
effects. All task, provider and dead-letter handlers are ``@kopf.on.event``: they cost no API call
(no progress annotations, no last-handled-configuration, **no finalizers**, so deleting a task
or a letter is instant) and only hand the body to the engine.

Active/standby: with ``--peering NAME`` a kopf daemon runs on our KopfPeering object. kopf stops
all daemons while the operator is paused by a higher-priority peer and respawns them when it
resumes, so the daemon's lifetime *is* "this replica is active"; it activates the engine on
start and deactivates it on stop. Without peering the engine is activated at startup.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Final

import aiohttp
import kopf
from prometheus_client import CollectorRegistry

from captchatask import kube, model
from captchatask.events import EventRecorder
from captchatask.signing import PingbackSigner
from captchatask_operator.admin import AdminServer, Health, create_app
from captchatask_operator.engine import COMPONENT, Engine, utcnow
from captchatask_operator.metrics import Metrics
from captchatask_operator.settings import Settings

logger = logging.getLogger(__name__)

PEERING_GROUP: Final = "kopf.dev"
PEERING_VERSION: Final = "v1"
#: Connections to the solver API: polls and submits run concurrently, across providers.
PROVIDER_CONNECTIONS: Final = 64
#: Grace for the leader daemon to hand over when kopf stops it.
DAEMON_CANCELLATION_TIMEOUT: Final = 10.0
#: kopf per-object workers alive at once (see configure_kopf).
WORKER_LIMIT: Final = 256
#: Seconds a kopf per-object worker waits for more events before freeing its slot (kopf: 5 s).
WORKER_IDLE_TIMEOUT: Final = 0.25


class Runtime:
    """Everything built at startup and torn down at cleanup (resources acquired in pairs).

    Parameters
    ----------
    settings
        Operator settings.
    registry
        Prometheus registry (``prometheus_client.REGISTRY`` in production).
    signer
        Pingback signer, or ``None`` without a key file.
    """

    def __init__(
        self, settings: Settings, *, registry: CollectorRegistry, signer: PingbackSigner | None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics(registry)
        self.signer = signer
        self.engine: Engine | None = None
        self.started = False
        self._kube_session: aiohttp.ClientSession | None = None
        self._http: aiohttp.ClientSession | None = None
        self._events: EventRecorder | None = None
        self._admin: AdminServer | None = None
        self.admin_port: int | None = None

    def require_engine(self) -> Engine:
        """The engine (startup has run)."""
        if self.engine is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.engine

    async def start(self) -> None:
        """Connect, build the engine, serve the admin port, activate unless peering decides.

        A failure releases what was taken so far: kopf retries a failed startup, and a retry
        that found the admin port still bound could never start.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = kube.load_config()
        self._kube_session = aiohttp.ClientSession(connector=kube.connector(config))
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=PROVIDER_CONNECTIONS)
        )
        client = kube.KubeClient(config, self._kube_session)
        self._events = EventRecorder(
            client,
            component=COMPONENT,
            instance=socket.gethostname(),
            clock=utcnow,
            enabled=self.settings.events,
        )
        self._events.poster.on_crash = self.metrics.track_loop(
            "event-poster", healthy=lambda: self._events is None or self._events.poster.healthy
        )
        self._events.start()
        engine = Engine(
            client=client,
            http=self._http,
            signer=self.signer,
            settings=self.settings,
            metrics=self.metrics,
            events=self._events,
            instance=socket.gethostname(),
        )
        self.engine = engine
        self._admin = AdminServer(
            create_app(
                self.registry,
                Health(
                    started=lambda: self.started,
                    active=lambda: engine.active,
                    before_scrape=engine.refresh_gauges,
                    unready=engine.unhealthy_loops,
                ),
            ),
            host=self.settings.admin_host,
            port=self.settings.admin_port,
        )
        self.admin_port = await self._admin.start()
        logger.info("admin endpoints on %s:%s", self.settings.admin_host, self.admin_port)
        if not self.settings.peering_enabled:
            await engine.activate()
        self.started = True

    async def stop(self) -> None:
        """Deactivate and release everything started in :meth:`start` (idempotent)."""
        if self.engine is not None:
            while self.engine.active:
                await self.engine.deactivate()
        if self._events is not None:
            await self._events.close()
            self._events = None
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        for session in (self._http, self._kube_session):
            if session is not None:
                await session.close()
        self._http = self._kube_session = None


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Tune kopf for an event-only operator of many small objects (each value explained)."""
    # Watches end server-side after this long and are re-opened: half-dead connections heal,
    # and shutdown never waits for a long-poll.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout
    kopf_settings.watching.client_timeout = settings.watch_server_timeout + 30
    kopf_settings.watching.connect_timeout = 10
    # kopf's own client retries 429s and 5xx itself: give it the schedule our client uses
    # (client-go's ten retries) and let a server-named Retry-After win over the schedule, as
    # client-go and captchatask.kube do, rather than re-implement retries around kopf.
    kopf_settings.networking.error_backoffs = kube.DEFAULT_RETRY.kopf_backoffs()
    kopf_settings.networking.enforce_retry_after = True
    # We post our own Events on every transition; kopf's are only useful for its problems.
    kopf_settings.posting.level = logging.WARNING
    # An event handler is a dictionary update. kopf keeps one worker per object with pending
    # events; bound them so a 10,000-object re-list does not start 10,000 coroutines at once.
    kopf_settings.queueing.worker_limit = WORKER_LIMIT
    # ...but a worker holds its slot until its object has been quiet for idle_timeout (kopf's
    # default 5 s), and our own writes (intent, Submitted) keep the slots of the tasks being
    # submitted busy: 256 slots / >= 5 s capped intake at ~50 new objects/s (BENCH-3). A worker
    # that is idle for a fraction of a second costs nothing to restart, so release it quickly.
    kopf_settings.queueing.idle_timeout = WORKER_IDLE_TIMEOUT
    # Errors in our handlers are bugs; retry them quickly rather than after kopf's minute.
    kopf_settings.execution.default_backoff = 5
    # Peering (only used with --peering): takeover happens within one lifetime of silence.
    kopf_settings.peering.lifetime = settings.peering_lifetime
    kopf_settings.peering.priority = settings.peering_priority
    # No finalizers are ever needed (no on.delete/create/update handlers); keep kopf's default
    # finalizer name unused. The leader daemon's finalizer only lands on the KopfPeering object.


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """Register every handler on a fresh registry bound to ``runtime``."""
    registry = kopf.OperatorRegistry()
    settings = runtime.settings

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """Log in like ``kopf run``: in-cluster service account, else the kubeconfig."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(**_: Any) -> None:
        """Build the runtime once (settings were read before kopf started)."""
        await runtime.start()

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        """Release what startup acquired."""
        await runtime.stop()

    @kopf.on.event(
        model.GROUP, model.VERSION, model.TASK_PLURAL, registry=registry, id="task-event"
    )
    async def task_event(event: kopf.RawEvent, **_: Any) -> None:
        """Every CaptchaTask watch event: update the index and the schedule (no API call)."""
        runtime.require_engine().observe_task(event.get("type"), event["object"])

    @kopf.on.event(
        model.GROUP, model.VERSION, model.PROVIDER_PLURAL, registry=registry, id="provider-event"
    )
    async def provider_event(event: kopf.RawEvent, **_: Any) -> None:
        """Every CaptchaProvider watch event: (re)check it when its spec changed."""
        runtime.require_engine().observe_provider(event.get("type"), event["object"])

    @kopf.on.event(
        model.GROUP,
        model.VERSION,
        model.DEAD_LETTER_PLURAL,
        registry=registry,
        id="deadletter-event",
    )
    async def dead_letter_event(event: kopf.RawEvent, **_: Any) -> None:
        """Every CaptchaDeadLetter watch event: index it and (re)schedule its requeue."""
        runtime.require_engine().observe_letter(event.get("type"), event["object"])

    if settings.peering_enabled:
        plural = "clusterkopfpeerings" if settings.all_namespaces else "kopfpeerings"
        peering_name = settings.peering

        def is_ours(name: str, **_: Any) -> bool:
            return name == peering_name

        @kopf.daemon(
            PEERING_GROUP,
            PEERING_VERSION,
            plural,
            registry=registry,
            when=is_ours,
            id="leader",
            cancellation_timeout=DAEMON_CANCELLATION_TIMEOUT,
        )
        async def leader(stopped: kopf.DaemonStopped, **_: Any) -> None:
            """Active while kopf runs this daemon, i.e. while no peer outranks this replica."""
            engine = runtime.require_engine()
            await engine.activate()
            try:
                await stopped.wait()
            finally:
                await engine.deactivate()

        # kopf gives every daemon a finalizer on its object, to stop the daemon before the
        # object goes. Ours is the peering object the chart installs: `helm uninstall` deletes it
        # together with the operator pods, nobody is left to remove the finalizer, and the
        # uninstall hung for ever with the object stuck Terminating. The daemon needs no goodbye
        # (the engine deactivates when kopf cancels it), so it runs without one; kopf also
        # removes the finalizer an earlier version left ("no handlers requiring it").
        _run_without_finalizer(registry, "leader")

    return registry


def _run_without_finalizer(registry: kopf.OperatorRegistry, handler_id: str) -> None:
    """Clear ``requires_finalizer`` of a daemon, which ``kopf.daemon`` always sets.

    kopf has no public switch for it, so the registered (frozen) handler is replaced by a copy.
    """
    spawning = registry._spawning
    handlers = spawning._handlers
    for index, handler in enumerate(handlers):
        if handler.id == handler_id:
            handlers[index] = dataclasses.replace(handler, requires_finalizer=False)
