"""Drive one chaos run: start the stack, create tasks, inject the planned faults, collect.

Everything that touches processes or the network lives here; the checks are in
:mod:`bench.chaos.verdict` and only see the :class:`~bench.chaos.verdict.Snapshot` this module
collects at the end.

Metrics across restarts. A SIGKILLed process takes its counters with it, so the run scrapes
each component's ``/metrics`` once a second and, immediately before every kill, once more; the
last scrape of each incarnation is kept and the counters are summed over incarnations. A result
the operator (or sidecar) recorded between that last scrape and the kill is in the ledger but
in no scrape: the verdict therefore allows, per kill, exactly the results whose ledger
timestamp falls inside that gap, and no other difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.chaos.plan import FaultEvent, FaultKind, Plan, TaskPlan
from bench.chaos.profiles import Profile
from bench.chaos.scan import Leak, find_leaks, find_token_leaks
from bench.chaos.verdict import UNSOLVABLE_CODE, KillWindow, LateTask, Samples, Snapshot
from captchatask import kube, model
from captchatask.provider import codes
from captchatask.signing import PingbackSigner, load_keys
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "chaos"
#: Concurrent task creations (the application's side: many workers creating tasks).
CREATE_CONCURRENCY: Final = 16
#: Pause between retries of a request the outage refused.
RETRY_SECONDS: Final = 0.25
#: Metrics (and the spool depth) are sampled this often; the drain time is as coarse.
SCRAPE_SECONDS: Final = 0.5
SETTLE_POLL_SECONDS: Final = 2.0
#: SIGTERM's time to answer the requests in flight before kube-apiserver is killed (open watches
#: otherwise hold a stop for the test bed's whole stop timeout, 15 s, and a planned 4 s outage
#: lasted 19 s). In-flight writes are answered, so no write lands after its writer gave up.
APISERVER_STOP_GRACE: Final = 2.0
#: A ledger timestamp this long before a pre-kill scrape may still miss that scrape (the
#: metric is incremented after the status write returns).
SCRAPE_SLACK_SECONDS: Final = 1.0
#: Added to the run's hang guard for start-up waits, restarts and the final collection.
RUN_SLACK_SECONDS: Final = 240.0
HTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=10)
#: How often the ``spool-full`` fault looks for the receiver's 503s during the outage.
SPOOL_FULL_POLL_SECONDS: Final = 0.2
#: Provider task ids of planted pingbacks: ten digits, outside the emulator's id range.
PLANTED_ID_BASE: Final = 10_000_000_000
#: Hang guard for the late tasks' submission and solve (a failure bound, not a measurement).
LATE_WAIT_SECONDS: Final = 30.0
#: How long the late-outage fault waits for its provider's first successful check.
LATE_PROVIDER_READY_SECONDS: Final = 120.0
#: The provider of the late tasks, and its first fallback poll: after their deadlines.
LATE_PROVIDER: Final = "late"
LATE_FIRST_POLL_SECONDS: Final = 600

Say = Callable[[str], None]


@dataclass
class Scrapes:
    """The last good scrape of each incarnation of one component."""

    url: str
    finals: list[Samples] = field(default_factory=list)
    current: Samples = field(default_factory=dict)
    #: Bumped at every kill, so a scrape that straddles a kill is not credited to the wrong
    #: incarnation.
    generation: int = 0

    def close_incarnation(self, last: Samples | None) -> None:
        """Keep the incarnation's last scrape and start a new one."""
        self.finals.append(last if last is not None else self.current)
        self.current = {}
        self.generation += 1

    def all_incarnations(self) -> list[Samples]:
        """Every incarnation's final scrape, the running one last."""
        return [*self.finals, self.current]


@dataclass
class Timeline:
    """What actually happened when (wall-clock seconds since the epoch)."""

    started: float = 0.0
    first_create: float = 0.0
    last_create: float = 0.0
    settled: float = 0.0
    apiserver_back: float | None = None
    #: When kube-apiserver was started again (it answers a moment later).
    apiserver_restarting: float | None = None
    outage_seconds: float = 0.0
    #: How long kube-apiserver was away in the ``apiserver-away-past-deadlines`` fault.
    late_outage_seconds: float = 0.0
    spool_drained: float | None = None
    max_spool_depth: float = 0.0
    #: The deepest the spool got while the receiver ran with the profile's bound (``None``:
    #: the bound was never lifted, so ``max_spool_depth`` is that figure).
    max_spool_depth_bounded: float | None = None
    #: (seconds after the first task, spool depth) at every change of the sampled depth.
    spool_depths: list[tuple[float, float]] = field(default_factory=list)
    operator_kills: list[KillWindow] = field(default_factory=list)
    sidecar_kills: list[KillWindow] = field(default_factory=list)
    #: When the receiver first answered 503 "spool full", and whether it was unready then.
    spool_full_at: float | None = None
    spool_full_unready: bool = False
    executed: list[str] = field(default_factory=list)
    create_retries: int = 0


def parse_samples(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = float(sample.value)
    return samples


#: Provider dialects a run can speak. 2captcha documents bulk ``ids=`` polling (on by default
#: there); CaptchaAI does not (off), so its run polls one id per request.
DIALECTS: Final = ("captchaai", "2captcha")
#: How the emulator delivers pingbacks in each dialect (CaptchaAI's blog: GET; 2captcha: POST).
PINGBACK_STYLES: Final = {"captchaai": "cai-get", "2captcha": "2c-post"}


def stack_config(
    profile: Profile, seed: int, workdir: Path, *, dialect: str = DIALECTS[0]
) -> StackConfig:
    """The stack of a chaos run: fault rates on the emulator, short timings everywhere."""
    sent = 1.0 - profile.drop_fraction  # duplicate and late apply to pingbacks actually sent
    emulator_args = [
        "--pingback-style", PINGBACK_STYLES[dialect],
        "--solve-time-scale", str(profile.solve_time_scale),
        "--unsolvable-rate", str(profile.unsolvable_rate),
        "--threads", str(profile.tasks * 2),
        "--retention-seconds", "7200",
        "--pingback-drop-rate", str(profile.drop_fraction),
        "--pingback-duplicate-rate", f"{profile.duplicate_fraction / sent:.6f}",
        "--pingback-late-rate", f"{profile.late_fraction / sent:.6f}",
        "--pingback-late-delay", str(profile.late_delay_seconds),
    ]  # fmt: skip
    sidecar_args = []
    if profile.spool_max_records:
        sidecar_args = ["--spool-max-records", str(profile.spool_max_records)]
    return StackConfig(
        workdir=workdir,
        namespace=NAMESPACE,
        seed=seed,
        emulator_args=emulator_args,
        sidecar_args=sidecar_args,
        provider_spec={
            "dialect": dialect,
            "polling": {
                "callbackTimeoutSeconds": profile.callback_timeout_seconds,
                "intervalSeconds": profile.poll_interval_seconds,
                "maxPolls": profile.max_polls,
            },
        },
    )


def task_body(task: TaskPlan) -> dict[str, Any]:
    """The CaptchaTask manifest of a planned task."""
    return {
        "apiVersion": model.API_VERSION,
        "kind": model.TASK_KIND,
        "metadata": {"name": task.name, "labels": {"chaos/type": task.type.lower()}},
        "spec": task.spec,
    }


class ChaosRun:
    """One run; :meth:`execute` returns the snapshot the verdict is computed from."""

    def __init__(
        self,
        *,
        profile: Profile,
        plan: Plan,
        workdir: Path,
        say: Say,
        dialect: str = DIALECTS[0],
    ) -> None:
        self.profile = profile
        self.plan = plan
        self.workdir = workdir
        self.say = say
        self.dialect = dialect
        self.stack = Stack(stack_config(profile, plan.seed, workdir, dialect=dialect), progress=say)
        self.timeline = Timeline()
        self.sidecar = Scrapes(self.stack.sidecar_metrics_url)
        self.operator = Scrapes(self.stack.operator_metrics_url)
        self.planted: list[str] = []
        self.late: list[LateTask] = []
        self._client: kube.KubeClient | None = None
        self._t0 = 0.0
        self._stop_sampling = asyncio.Event()
        self._killing: set[str] = set()
        self._reply_lost_bursts = 0
        self.leaks: list[Leak] = []
        #: Faults that could not be injected (the run then fails: it did not test what it says).
        self.errors: list[str] = []

    # -- entry point ---------------------------------------------------------------------------
    def execute(self) -> Snapshot:
        """Run everything and return the snapshot (the stack is stopped afterwards)."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.timeline.started = time.time()
        try:
            self.stack.start()
            return asyncio.run(asyncio.wait_for(self._main(), self._budget()))
        finally:
            self.stack.stop()

    def _budget(self) -> float:
        """The whole run's hang guard: creation, settling, and time for restarts and checks."""
        p = self.profile
        return p.create_seconds + p.outage_seconds + p.settle_seconds + RUN_SLACK_SECONDS

    async def _main(self) -> Snapshot:
        config = kube.load_config(str(self.stack.plane.kubeconfig))
        async with (
            aiohttp.ClientSession(connector=kube.connector(config)) as kube_session,
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        ):
            client = kube.KubeClient(config, kube_session)
            self._client = client
            signer = PingbackSigner(load_keys(self.stack.key_file))
            sampler = asyncio.create_task(self._sample(http))
            self._t0 = time.monotonic()
            self.timeline.first_create = time.time()
            faults = asyncio.create_task(self._faults(http, signer))
            await self._create_all(client)
            self.timeline.last_create = time.time()
            await faults
            await self._settle(client, http)
            self._stop_sampling.set()
            await sampler
            await self._scrape_all(http)
            snapshot = await self._collect(client)
            self.leaks = await self._scan(client, http)
            return snapshot

    # -- tasks ---------------------------------------------------------------------------------
    async def _create_all(self, client: kube.KubeClient) -> None:
        gate = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def create(task: TaskPlan) -> None:
            await self._sleep_until(task.at)
            async with gate:
                await self._create(client, task)

        await asyncio.gather(*(create(task) for task in self.plan.tasks))
        self.say(f"created {len(self.plan.tasks)} tasks")

    async def _create(self, client: kube.KubeClient, task: TaskPlan) -> None:
        await self._create_body(client, task_body(task))

    async def _create_body(self, client: kube.KubeClient, body: dict[str, Any]) -> None:
        while True:
            try:
                await client.create(kube.TASKS, NAMESPACE, body, timeout=5.0)
                return
            except kube.KubeUnavailable:
                self.timeline.create_retries += 1
            except kube.ApiError as exc:
                if exc.status == 409:
                    return
                # The API server answers 5xx/404 while it starts (CRDs not yet served).
                if exc.status < 500 and exc.status != 404:
                    raise
                self.timeline.create_retries += 1
            await asyncio.sleep(RETRY_SECONDS)

    async def _sleep_until(self, at: float) -> None:
        delay = self._t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- faults --------------------------------------------------------------------------------
    async def _faults(self, http: aiohttp.ClientSession, signer: PingbackSigner) -> None:
        running: list[asyncio.Task[None]] = []
        for event in self.plan.faults:
            await self._sleep_until(event.at)
            running.append(asyncio.create_task(self._inject(event, http, signer)))
        await asyncio.gather(*running)

    async def _inject(
        self, event: FaultEvent, http: aiohttp.ClientSession, signer: PingbackSigner
    ) -> None:
        actual = time.monotonic() - self._t0
        self.say(f"fault  {event.describe()}  (at t+{actual:.2f}s)")
        self.timeline.executed.append(f"{event.describe()} (executed t+{actual:.2f}s)")
        try:
            await self._inject_one(event, http, signer)
        except Exception as exc:
            self.errors.append(f"{event.describe()}: {type(exc).__name__}: {exc}")
            self.say(f"FAULT INJECTION FAILED: {event.describe()}: {exc}")

    async def _inject_one(
        self, event: FaultEvent, http: aiohttp.ClientSession, signer: PingbackSigner
    ) -> None:
        if event.kind is FaultKind.APISERVER_OUTAGE:
            stopped = time.time()
            await asyncio.to_thread(self.stack.plane.stop_apiserver, grace=APISERVER_STOP_GRACE)
            await asyncio.sleep(max(0.0, stopped + event.amount - time.time()))
            self.timeline.apiserver_restarting = time.time()
            await asyncio.to_thread(self.stack.plane.start_apiserver)
            self.timeline.apiserver_back = time.time()
            self.timeline.outage_seconds = self.timeline.apiserver_back - stopped
            self.say(f"kube-apiserver is back after {self.timeline.outage_seconds:.1f}s")
        elif event.kind is FaultKind.SIDECAR_KILL:
            await self._kill_restart("sidecar", self.sidecar, self.timeline.sidecar_kills, http)
        elif event.kind is FaultKind.OPERATOR_KILL:
            await self._kill_restart("operator", self.operator, self.timeline.operator_kills, http)
        elif event.kind is FaultKind.RES_502_BURST:
            await asyncio.to_thread(
                self.stack.emulator,
                "faults/res-502-burst",
                {"seconds": event.amount, "until_met": True},
            )
        elif event.kind is FaultKind.PLANT_DEAD_LETTER:
            await self._plant(event.amount, http, signer)
        elif event.kind is FaultKind.IN_REPLY_LOST:
            self._reply_lost_bursts += 1
            mode = "502" if self._reply_lost_bursts % 2 else "drop"
            await asyncio.to_thread(
                self.stack.emulator, "faults/in-reply-lost", {"count": event.amount, "mode": mode}
            )
        elif event.kind is FaultKind.SPOOL_FULL:
            await self._expect_spool_full(http)
        elif event.kind is FaultKind.APISERVER_AWAY_PAST_DEADLINES:
            await self._away_past_deadlines(event.amount, http, signer)

    async def _away_past_deadlines(
        self, seconds: int, http: aiohttp.ClientSession, signer: PingbackSigner
    ) -> None:
        """Submit the late tasks, stop kube-apiserver past their deadlines, pingback meanwhile.

        The run delivers each late task's pingback itself (the emulator's answer, signed URL)
        once kube-apiserver is gone and the emulator has solved the task: whatever fate the
        emulator drew for its own copy (dropped, say), every late task then has a result the
        receiver acknowledged, into its spool, before the task's deadline. The sidecar is
        SIGKILLed just before kube-apiserver returns and restarted once the operator has failed
        the late tasks, so the spooled results replay onto ``Failed`` tasks (had the drainer
        won the race, the tasks would simply have been Solved, proving nothing).
        """
        client = self._client
        assert client is not None
        await self._quiet_before_late_tasks()
        await self._late_provider(client)
        await self._provider_ready(client, LATE_PROVIDER)
        if self.profile.spool_max_records:
            # The spool-full fault is over: a receiver still at a bound of a few records would
            # refuse these pingbacks (503) behind the others the outage spools, and this fault
            # would test nothing. Restart it (a SIGKILL, counted) with the chart's default bound.
            self.timeline.max_spool_depth_bounded = self.timeline.max_spool_depth
            self.stack.config = replace(self.stack.config, sidecar_args=())
            await self._kill_restart("sidecar", self.sidecar, self.timeline.sidecar_kills, http)
        for task in self.plan.late_tasks:
            body = task_body(task)
            body["spec"]["providerRef"] = {"name": LATE_PROVIDER}
            await self._create_body(client, body)
        submitted = await self._submitted(client, [task.name for task in self.plan.late_tasks])
        stopped = time.time()
        # A stop, not a freeze (SIGSTOP): a frozen API server applies the writes it accepted
        # after their writers gave up, so results land in the ledger and in no counter, and
        # the verdict's metrics-vs-ledger check could not hold.
        await asyncio.to_thread(self.stack.plane.stop_apiserver, grace=APISERVER_STOP_GRACE)
        for name, body in submitted.items():
            meta, status = body["metadata"], body["status"]
            provider_id = str(status["providerTaskId"])
            code = await self._answer(provider_id)
            ref = model.TaskRef(namespace=NAMESPACE, name=name, uid=meta["uid"])
            url = signer.url(self.stack.pingback_url, ref)
            # Until the planned end of the outage only: a receiver whose spool is at its bound
            # answers 503 all that time, and the API server must still come back.
            acknowledged = await self._deliver_before(
                http, url, {"id": provider_id, "code": code}, stopped + seconds
            )
            created = model.parse_time(meta.get("creationTimestamp"))
            assert created is not None
            deadline = created.timestamp() + int(body["spec"]["deadlineSeconds"])
            self.late.append(
                LateTask(name, provider_id, acknowledged, deadline, created.timestamp())
            )
        await asyncio.sleep(max(0.0, stopped + seconds - time.time()))
        # The receiver is down when the API server returns (its pod rescheduled, say): the
        # operator fails the late tasks first, and only then do their spooled results replay.
        self._killing.add("sidecar")
        try:
            await self._kill("sidecar", self.sidecar, self.timeline.sidecar_kills, http)
            await asyncio.to_thread(self.stack.plane.start_apiserver)
            self.timeline.late_outage_seconds = time.time() - stopped
            self.say(f"kube-apiserver is back after {self.timeline.late_outage_seconds:.1f}s")
            await self._failed(client, [task.name for task in self.late if task.in_time])
            await asyncio.to_thread(self.stack.start_component, "sidecar")
            self.say("sidecar restarted after the operator ended the late tasks")
        finally:
            self._killing.discard("sidecar")

    async def _quiet_before_late_tasks(self) -> None:
        """Let the earlier faults end before the late tasks are submitted.

        The first outage may run long on a busy machine (kube-apiserver takes seconds to stop),
        and a lost ``in.php`` reply still pending would hit a late task, which then never learns
        its provider id: both would break this fault, not the system under test.
        """
        give_up = time.monotonic() + LATE_WAIT_SECONDS
        while self.timeline.apiserver_back is None and any(
            event.kind is FaultKind.APISERVER_OUTAGE for event in self.plan.faults
        ):
            if time.monotonic() > give_up:
                raise RuntimeError("the first API-server outage has not ended")
            await asyncio.sleep(RETRY_SECONDS)
        # Lost replies still pending are normally taken by the backlog of submissions (a
        # restarted operator may hold them back while its provider check meets a 502 burst);
        # whatever is left after the wait is cleared.
        give_up = time.monotonic() + LATE_WAIT_SECONDS
        while time.monotonic() < give_up:
            pending = await asyncio.to_thread(
                self.stack.emulator, "faults/in-reply-lost", {"count": 0}
            )
            if not pending.get("in_reply_lost_remaining"):
                return
            await asyncio.sleep(RETRY_SECONDS)
        cleared = await asyncio.to_thread(
            self.stack.emulator, "faults/in-reply-lost", {"clear": True}
        )
        self.say(f"{cleared['in_reply_lost_cleared']} lost in.php replies cleared first")

    async def _provider_ready(self, client: kube.KubeClient, name: str) -> None:
        """Wait until the operator has checked a provider and found it Ready.

        The late tasks have short deadlines: time spent waiting for a new provider's first
        check (which may meet a 502 burst) would be taken from them.
        """
        give_up = time.monotonic() + LATE_PROVIDER_READY_SECONDS
        while time.monotonic() < give_up:
            with contextlib.suppress(kube.KubeError):
                body = await client.get(kube.PROVIDERS, NAMESPACE, name, timeout=5.0)
                conditions = (body.get("status") or {}).get("conditions") or []
                if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                    return
            await asyncio.sleep(RETRY_SECONDS)
        raise RuntimeError(f"provider {name} never became Ready")

    async def _failed(self, client: kube.KubeClient, names: list[str]) -> None:
        """Wait until the operator has ended each task: failed it (its deadline passed in the
        outage), or, if a fallback poll made before the outage got there first, solved it."""
        give_up = time.monotonic() + LATE_WAIT_SECONDS
        pending = set(names)
        while pending:
            if time.monotonic() > give_up:
                raise RuntimeError(f"late tasks not failed by the operator: {sorted(pending)}")
            for name in sorted(pending):
                with contextlib.suppress(kube.KubeError):
                    body = await client.get(kube.TASKS, NAMESPACE, name, timeout=5.0)
                    phase = (body.get("status") or {}).get("phase")
                    if phase in (str(model.Phase.FAILED), str(model.Phase.SOLVED)):
                        pending.discard(name)
            await asyncio.sleep(RETRY_SECONDS)

    async def _late_provider(self, client: kube.KubeClient) -> None:
        """A copy of the default provider whose first fallback poll comes after the deadlines.

        Otherwise a poll made during the outage could record the answer first when the API
        server returns, and the fault would test nothing the ordinary outage does not.
        """
        default = await client.get(kube.PROVIDERS, NAMESPACE, "default", timeout=5.0)
        spec = dict(default["spec"])
        spec["polling"] = {
            **(spec.get("polling") or {}),
            "callbackTimeoutSeconds": LATE_FIRST_POLL_SECONDS,
        }
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.PROVIDER_KIND,
            "metadata": {"name": LATE_PROVIDER, "namespace": NAMESPACE},
            "spec": spec,
        }
        with contextlib.suppress(kube.ApiError):
            await client.create(kube.PROVIDERS, NAMESPACE, body, timeout=5.0)

    async def _submitted(
        self, client: kube.KubeClient, names: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Wait until the operator has submitted each task (its provider id is on record)."""
        give_up = time.monotonic() + LATE_WAIT_SECONDS
        found: dict[str, dict[str, Any]] = {}
        while len(found) < len(names):
            if time.monotonic() > give_up:
                raise RuntimeError(f"late tasks not submitted: {sorted(set(names) - set(found))}")
            for name in names:
                if name in found:
                    continue
                with contextlib.suppress(kube.KubeError):
                    body = await client.get(kube.TASKS, NAMESPACE, name, timeout=5.0)
                    if (body.get("status") or {}).get("providerTaskId"):
                        found[name] = body
            await asyncio.sleep(RETRY_SECONDS)
        return found

    async def _answer(self, provider_id: str) -> str:
        """The emulator's answer for one provider task, once it has one (a pingback's code)."""
        give_up = time.monotonic() + LATE_WAIT_SECONDS
        while time.monotonic() < give_up:
            listing = await asyncio.to_thread(self.stack.emulator, "tasks")
            for record in listing["tasks"]:
                if str(record["id"]) != provider_id:
                    continue
                if record.get("state") == "solved" and record.get("token"):
                    return str(record["token"])
                if record.get("state") == "unsolvable":
                    return UNSOLVABLE_CODE
            await asyncio.sleep(RETRY_SECONDS)
        raise RuntimeError(f"the emulator never finished provider task {provider_id}")

    async def _kill_restart(
        self, name: str, scrapes: Scrapes, kills: list[KillWindow], http: aiohttp.ClientSession
    ) -> None:
        self._killing.add(name)
        try:
            killed_at = await self._kill(name, scrapes, kills, http)
            await asyncio.to_thread(self.stack.start_component, name)
            self.say(f"{name} restarted ({time.time() - killed_at:.1f}s down)")
        finally:
            self._killing.discard(name)

    async def _kill(
        self, name: str, scrapes: Scrapes, kills: list[KillWindow], http: aiohttp.ClientSession
    ) -> float:
        """SIGKILL a component after a last scrape; return when it was killed (caller restarts)."""
        last = await self._scrape(http, scrapes.url)
        scraped_at = time.time()
        await asyncio.to_thread(self.stack.kill, name)
        killed_at = time.time()
        scrapes.close_incarnation(last)
        kills.append(KillWindow(scraped_at - SCRAPE_SLACK_SECONDS, killed_at))
        return killed_at

    async def _plant(
        self, number: int, http: aiohttp.ClientSession, signer: PingbackSigner
    ) -> None:
        """Send an authentic pingback for a task that does not exist: a dead letter to be."""
        name = f"planted-{number}-{secrets.token_hex(3)}"
        self.planted.append(name)
        ref = model.TaskRef(namespace=NAMESPACE, name=name, uid=str(uuid.uuid4()))
        url = signer.url(self.stack.pingback_url, ref)
        params = {"id": str(PLANTED_ID_BASE + number), "code": f"planted-token-{number}"}
        await self._deliver(http, url, params)

    async def _deliver(self, http: aiohttp.ClientSession, url: str, params: dict[str, str]) -> None:
        """Send one pingback until the receiver acknowledges it (HTTP 200)."""
        while True:  # the sidecar may be restarting: the test (unlike a provider) retries
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, params=params) as reply:
                    if reply.status == 200:
                        return
                    if reply.status < 500:
                        raise RuntimeError(f"pingback refused: HTTP {reply.status}")
            await asyncio.sleep(RETRY_SECONDS)

    async def _deliver_before(
        self, http: aiohttp.ClientSession, url: str, params: dict[str, str], until: float
    ) -> float | None:
        """:meth:`_deliver` until ``until`` (epoch); when it was acknowledged, or ``None``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.time())):
                await self._deliver(http, url, params)
                return time.time()
        return None

    async def _expect_spool_full(self, http: aiohttp.ClientSession) -> None:
        """Wait, inside the outage, for the bounded spool to refuse a pingback (503)."""
        readyz = self.stack.sidecar_metrics_url.removesuffix("/metrics") + "/readyz"
        key = ("captchatask_pingback_unavailable_total", (("reason", "spool_full"),))
        while self.timeline.apiserver_restarting is None:
            samples = await self._scrape(http, self.sidecar.url)
            # A sidecar killed inside the outage took its own count with it: count them all.
            earlier = sum(final.get(key, 0.0) for final in self.sidecar.finals)
            if earlier > 0 or (samples is not None and samples.get(key, 0.0) > 0):
                self.timeline.spool_full_at = time.time()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(readyz) as reply:
                        self.timeline.spool_full_unready = reply.status == 503
                self.say(
                    "spool bound reached: the receiver answers 503"
                    + (" and is unready" if self.timeline.spool_full_unready else "")
                )
                return
            await asyncio.sleep(SPOOL_FULL_POLL_SECONDS)
        raise RuntimeError("the spool bound was not reached during the outage")

    # -- metrics -------------------------------------------------------------------------------
    async def _scrape(self, http: aiohttp.ClientSession, url: str) -> Samples | None:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as reply:
                if reply.status != 200:
                    return None
                return parse_samples(await reply.text())
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _scrape_all(self, http: aiohttp.ClientSession) -> None:
        for name, scrapes in (("sidecar", self.sidecar), ("operator", self.operator)):
            if name in self._killing:
                continue  # the kill path owns this incarnation's last scrape
            generation = scrapes.generation
            samples = await self._scrape(http, scrapes.url)
            if (
                samples is not None
                and name not in self._killing
                and generation == scrapes.generation
            ):
                scrapes.current = samples

    async def _sample(self, http: aiohttp.ClientSession) -> None:
        while not self._stop_sampling.is_set():
            await self._scrape_all(http)
            depth = self.sidecar.current.get(("captchatask_pingback_spool_depth", ()), 0.0)
            self.timeline.max_spool_depth = max(self.timeline.max_spool_depth, depth)
            now = time.time()
            if not self.timeline.spool_depths or self.timeline.spool_depths[-1][1] != depth:
                self.timeline.spool_depths.append(
                    (round(now - self.timeline.first_create, 2), depth)
                )
            restarting = self.timeline.apiserver_restarting
            if restarting is not None and self.timeline.spool_drained is None and depth == 0:
                self.timeline.spool_drained = now  # first empty spool after the outage
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_sampling.wait(), SCRAPE_SECONDS)

    # -- settling and collection ---------------------------------------------------------------
    async def _list(self, client: kube.KubeClient, resource: kube.Resource) -> list[dict[str, Any]]:
        while True:
            try:
                listing = await client.list(resource, NAMESPACE, timeout=30.0)
                return list(listing.get("items", []))
            except kube.KubeUnavailable:
                await asyncio.sleep(RETRY_SECONDS)

    def spool_bytes(self) -> int:
        """Bytes in spool segments (0 once everything is drained)."""
        return sum(path.stat().st_size for path in self.stack.spool_dir.glob("spool-*.log"))

    async def _settle(self, client: kube.KubeClient, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.profile.settle_seconds
        terminal = {str(model.Phase.SOLVED), str(model.Phase.FAILED)}
        while True:
            tasks = await self._list(client, kube.TASKS)
            letters = await self._list(client, kube.DEAD_LETTERS)
            done = sum(1 for t in tasks if t.get("status", {}).get("phase") in terminal)
            samples = await self._scrape(http, self.sidecar.url) or {}
            depth = samples.get(("captchatask_pingback_spool_depth", ()), -1.0)
            spool = self.spool_bytes()
            settled = (
                len(tasks) == len(self.plan.tasks) + len(self.plan.late_tasks)
                and done == len(tasks)
                and depth == 0
                and spool == 0
                and len(letters) >= len(self.planted)
            )
            if settled:
                self.timeline.settled = time.time()
                self.say(f"settled: {done} tasks terminal, spool empty, {len(letters)} letters")
                return
            if time.monotonic() > deadline:
                self.timeline.settled = time.time()
                self.say(
                    f"NOT settled after {self.profile.settle_seconds:.0f}s: {done}/{len(tasks)}"
                    f" terminal, spool depth {depth}, {spool} spool bytes, {len(letters)} letters"
                )
                return
            self.say(f"settling: {done}/{len(tasks)} terminal, spool depth {depth:.0f}")
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    async def _collect(self, client: kube.KubeClient) -> Snapshot:
        emulator_tasks = await asyncio.to_thread(self.stack.emulator, "tasks")
        summary = await asyncio.to_thread(self.stack.emulator, "summary")
        return Snapshot(
            planned={task.name: task.type for task in (*self.plan.tasks, *self.plan.late_tasks)},
            tasks=await self._list(client, kube.TASKS),
            dead_letters=await self._list(client, kube.DEAD_LETTERS),
            events=await self._list(client, kube.EVENTS),
            emulator_tasks=list(emulator_tasks["tasks"]),
            emulator_summary=dict(summary),
            operator_metrics=self.operator.all_incarnations(),
            sidecar_metrics=self.sidecar.all_incarnations(),
            operator_kills=list(self.timeline.operator_kills),
            sidecar_kills=list(self.timeline.sidecar_kills),
            spool_bytes=self.spool_bytes(),
            planted=list(self.planted),
            callback_timeout_seconds=float(self.profile.callback_timeout_seconds),
            spool_max_records=self.profile.spool_max_records,
            res_502_outages=[
                float(event.amount)
                for event in self.plan.faults
                if event.kind is FaultKind.RES_502_BURST
            ],
            late=list(self.late),
        )

    # -- secrets -------------------------------------------------------------------------------
    def secrets(self) -> dict[str, str]:
        """The secrets that must never show: the solver API key and every pingback HMAC key."""
        keys = {"solver API key": self.stack.api_key}
        for number, key in enumerate(load_keys(self.stack.key_file)):
            keys[f"pingback HMAC key #{number}"] = key.decode()
        return keys

    async def _scan(self, client: kube.KubeClient, http: aiohttp.ClientSession) -> list[Leak]:
        """Scan logs, Events (all namespaces), our objects and both /metrics for the secrets."""
        sources: list[tuple[str, str]] = []
        for path in self.stack.logs():
            if path.name == "emulator.log":
                continue  # the emulator plays the provider, which must know the key
            sources.append((f"log {path.name}", path.read_text(encoding="utf-8", errors="replace")))
        for resource in (kube.TASKS, kube.PROVIDERS, kube.DEAD_LETTERS):
            listing = await client.list(resource, NAMESPACE, timeout=30.0)
            sources.append((resource.plural, json.dumps(listing)))
        events = await client.list(kube.EVENTS, None, timeout=30.0)
        sources.append(("events (all namespaces)", json.dumps(events)))
        for name, url in (
            ("sidecar /metrics", self.stack.sidecar_metrics_url),
            ("operator /metrics", self.stack.operator_metrics_url),
        ):
            async with http.get(url) as reply:
                sources.append((name, await reply.text()))
        # Tokens belong in the objects and the spool: only logs, Events and metrics are searched.
        objects = {kube.TASKS.plural, kube.PROVIDERS.plural, kube.DEAD_LETTERS.plural}
        token_sources = [(name, text) for name, text in sources if name not in objects]
        tokens = await self._tokens(client)
        sources.extend(
            (f"spool {path.name}", path.read_bytes().decode("latin-1"))
            for path in sorted(self.stack.spool_dir.glob("*"))
            if path.is_file()
        )
        return find_leaks(self.secrets(), sources) + find_token_leaks(tokens, token_sources)

    async def _tokens(self, client: kube.KubeClient) -> dict[str, list[str]]:
        """Every task's pingback path token and every solution token (recorded or dead-lettered)."""
        signer = PingbackSigner(load_keys(self.stack.key_file))
        tasks = (await client.list(kube.TASKS, NAMESPACE, timeout=30.0)).get("items") or []
        letters = (await client.list(kube.DEAD_LETTERS, NAMESPACE, timeout=30.0)).get("items")
        path_tokens = [signer.token(model.TaskView.from_body(body).ref) for body in tasks]
        solutions = [
            token
            for body in tasks
            if (token := ((body.get("status") or {}).get("solution") or {}).get("token"))
        ]
        solutions += [
            code
            for body in letters or []
            if (code := ((body.get("spec") or {}).get("payload") or {}).get("code"))
            and not code.startswith("ERROR")
            and code not in codes.known_codes()  # a provider's verdict, not a solution
        ]
        return {"pingback token": path_tokens, "solution token": solutions}
