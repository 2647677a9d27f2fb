"""Each part of the engine on its own, against a small fake of :class:`EngineActions`.

The parts (provider checks, submission, polling, dead-letter requeue, endings) reach the engine only
through :class:`~captchatask_operator.actions.EngineActions`; these tests stand in a fake that
records what a part asked for, so one part's decisions are read here without an engine, a
timer or an API server. The API client points nowhere: none of these paths may need it. The
engine wired to a real control plane is exercised by the other tests of this directory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from captchatask import kube, model
from captchatask.emulator.config import DEFAULT_API_KEY
from captchatask.emulator.server import RunningEmulator
from captchatask.events import EventRecorder, EventType
from captchatask.ledger import Ledger
from captchatask.model import TaskRef, TaskView
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Dialect
from captchatask.provider.tasks import build_submit_params
from captchatask_operator import policy
from captchatask_operator import settings as settings_module
from captchatask_operator.actions import Counters, Deps, EngineActions, ProviderState
from captchatask_operator.endings import Endings, camel
from captchatask_operator.index import TaskIndex
from captchatask_operator.metrics import Metrics
from captchatask_operator.policy import WaitReason
from captchatask_operator.polling import Poller
from captchatask_operator.providers import ProviderChecks
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.requeue import Requeuer
from captchatask_operator.schedule import Kind
from captchatask_operator.submission import Submitter
from captchatask_operator.timer import Timer

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
NS = "shop"
PROVIDER = (NS, "default")


class FakeEngine:
    """Records what a part asks of the engine; holds the little state the parts read."""

    def __init__(self) -> None:
        self.now = T0
        self.tasks = TaskIndex()
        self.providers: dict[tuple[str, str], ProviderState] = {}
        self.busy: set[tuple[str, str]] = set()
        self.counters = Counters()
        self.ledger_unavailable_at: dt.datetime | None = None
        self.ledger_unavailable_since: dt.datetime | None = None
        self.views: dict[TaskRef, TaskView] = {}
        self.scheduled: dict[tuple[Kind, str, str], dt.datetime] = {}
        self.spawned: list[Coroutine[Any, Any, None]] = []
        self.calls: list[tuple[str, ...]] = []

    def clock(self) -> dt.datetime:
        return self.now

    def watched(self, namespace: str) -> bool:
        return namespace == NS

    def note_ledger_unavailable(self) -> None:
        self.ledger_unavailable_since = self.ledger_unavailable_since or self.now
        self.ledger_unavailable_at = self.now

    async def ledger_back(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.spawned.append(coro)

    def schedule_at(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        self.scheduled[(kind, *key)] = due

    def schedule_no_later(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        entry = (kind, *key)
        self.scheduled[entry] = min(due, self.scheduled.get(entry, due))

    def unschedule(self, kind: Kind, key: tuple[str, str]) -> None:
        self.scheduled.pop((kind, *key), None)
        self.calls.append(("unschedule", str(kind), *key))

    async def fresh(self, ref: TaskRef) -> TaskView | None:
        return self.views.get(ref)

    async def fresh_compact(self, ref: TaskRef) -> TaskView | None:
        return self.views.get(ref)

    def store(self, view: TaskView) -> TaskRecord:
        record = TaskRecord.from_view(view, now=self.now)
        self.tasks.put(record)
        self.calls.append(("store", view.ref.name))
        return record

    def remember(self, view: TaskView | None) -> TaskRecord | None:
        self.calls.append(("remember", view.ref.name if view else "-"))
        return None if view is None else self.store(view)

    async def fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> None:
        self.calls.append(("fail", ref.name, code))

    def event(self, ref: TaskRef, type_: EventType, reason: str, message: str) -> None:
        self.calls.append(("event", ref.name, reason))

    def provider_not_ready(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        self.calls.append(("provider_not_ready", state.spec.name, verdict.reason))

    def store_provider(self, body: Mapping[str, Any]) -> None:
        self.calls.append(("store_provider",))

    def in_flight(self, provider_key: tuple[str, str]) -> int:
        return 0

    def reconsider_provider_tasks(self, provider_key: tuple[str, str]) -> None:
        self.calls.append(("reconsider", *provider_key))

    def pump(self, provider_key: tuple[str, str]) -> None:
        self.calls.append(("pump", *provider_key))

    def take_polls(
        self, provider_key: tuple[str, str], *, by: float, limit: int
    ) -> list[tuple[tuple[str, str], float]]:
        return []


def _conforms(fake: FakeEngine) -> EngineActions:
    return fake  # mypy checks that the fake is a complete EngineActions


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    yield engine
    for coro in engine.spawned:
        coro.close()  # never started: nothing to await


@pytest.fixture
async def deps(fake: FakeEngine) -> AsyncIterator[Deps]:
    settings = settings_module.parse(["--namespace", NS], {})
    async with aiohttp.ClientSession() as session:
        client = kube.KubeClient(kube.KubeConfig(server="https://127.0.0.1:9"), session)
        yield Deps(
            client=client,
            ledger=Ledger(client, clock=fake.clock),
            http=session,
            signer=None,
            settings=settings,
            metrics=Metrics(CollectorRegistry()),
            events=EventRecorder(
                client, component="test", instance="test", clock=fake.clock, enabled=False
            ),
            clock=fake.clock,
            identity="test",
        )


def provider_state(*, ready: bool = True, checked: bool = True) -> ProviderState:
    spec = ProviderSpec.from_body(
        {
            "metadata": {"namespace": NS, "name": "default", "uid": "uid-p"},
            "spec": {"dialect": "captchaai", "apiKeySecretRef": {"name": "s"}},
        }
    )
    return ProviderState(spec=spec, ready=ready, reason="Ready", checked=checked)


def task_body(name: str, *, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "namespace": NS,
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "5",
            "creationTimestamp": model.format_time(T0),
        },
        "spec": {"type": "Turnstile", "providerRef": {"name": "default"}},
    }
    if status is not None:
        body["status"] = status
    return body


def put_task(fake: FakeEngine, name: str, *, status: dict[str, Any] | None = None) -> TaskRecord:
    view = TaskView.from_body(task_body(name, status=status))
    fake.views[view.ref] = view
    record = TaskRecord.from_view(view, now=T0)
    fake.tasks.put(record)
    return record


# -- provider checks ---------------------------------------------------------------------------


async def test_a_config_error_marks_a_ready_provider_not_ready_and_rechecks_it_later(
    fake: FakeEngine, deps: Deps
) -> None:
    checks = ProviderChecks(_conforms(fake), deps)
    state = provider_state()
    verdict = policy.ProviderVerdict(
        ready=False, reason=policy.ProviderReason.INVALID_KEY, message="bad key"
    )

    checks.mark_not_ready(state, verdict)

    assert (state.ready, state.reason, state.message) == (False, "InvalidKey", "bad key")
    retry = dt.timedelta(seconds=deps.settings.provider_retry_seconds)
    assert fake.scheduled == {(Kind.PROVIDER, *PROVIDER): T0 + retry}


async def test_one_check_per_provider_runs_at_a_time(fake: FakeEngine, deps: Deps) -> None:
    checks = ProviderChecks(_conforms(fake), deps)

    checks.start(PROVIDER)
    checks.start(PROVIDER)

    assert len(fake.spawned) == 1


# -- submission --------------------------------------------------------------------------------


async def test_a_task_gone_before_its_submission_is_left_alone(
    fake: FakeEngine, deps: Deps
) -> None:
    record = put_task(fake, "t1")
    del fake.views[record.ref]

    await Submitter(_conforms(fake), deps).submit(record)

    assert fake.calls == []
    assert fake.counters == Counters()


async def test_a_submission_without_a_provider_only_stores_the_fresh_task(
    fake: FakeEngine, deps: Deps
) -> None:
    record = put_task(fake, "t1")

    await Submitter(_conforms(fake), deps).submit(record)

    assert fake.calls == [("store", "t1")]
    assert fake.counters.submits == 0


async def test_a_finished_task_gets_no_waiting_condition(fake: FakeEngine, deps: Deps) -> None:
    record = put_task(fake, "t1", status={"phase": "Solved"})

    await Submitter(_conforms(fake), deps).write_waiting(record, WaitReason.QUEUED, "queued")

    assert fake.calls == [("remember", "t1"), ("store", "t1")]
    assert fake.counters.status_writes == 0


# -- polling -----------------------------------------------------------------------------------


async def test_polls_of_a_provider_without_a_client_go_out_at_once_and_come_back_later(
    fake: FakeEngine, deps: Deps
) -> None:
    poller = Poller(_conforms(fake), deps)
    first = put_task(fake, "t1", status={"phase": "Submitted", "providerTaskId": "7001"})
    second = put_task(fake, "t2", status={"phase": "Submitted", "providerTaskId": "7002"})
    fake.providers[PROVIDER] = provider_state(ready=False)

    poller.collect(PROVIDER, first.key, due=T0.timestamp())
    poller.collect(PROVIDER, second.key, due=T0.timestamp() + 1)
    assert poller.flush(T0.timestamp()) is None  # nothing held: no bulk client to wait for
    assert poller.batches == {}
    assert len(fake.spawned) == 1
    await fake.spawned.pop()

    later = T0 + dt.timedelta(seconds=deps.settings.provider_retry_seconds)
    assert fake.scheduled == {
        (Kind.POLL, *first.key): later,
        (Kind.POLL, *second.key): later,
    }
    assert fake.counters.poll_requests == 0


async def test_polls_of_a_provider_not_checked_yet_are_retried_soon(
    fake: FakeEngine, deps: Deps
) -> None:
    poller = Poller(_conforms(fake), deps)
    task = put_task(fake, "t1", status={"phase": "Submitted", "providerTaskId": "7001"})
    fake.providers[PROVIDER] = provider_state(ready=False, checked=False)

    await poller.poll_batch(PROVIDER, [task.key, (NS, "gone")])

    assert fake.scheduled == {(Kind.POLL, *task.key): T0 + policy.UNCHECKED_RETRY}


@pytest.mark.parametrize(
    ("dialect", "requests", "sizes"),
    [
        (Dialect.TWOCAPTCHA, 2, {"1.0": 1, "2.0": 2, "3.0": 2}),  # bulk ids=: 2 ids, then 1
        (Dialect.CAPTCHAAI, 3, {"1.0": 3, "2.0": 3, "3.0": 3}),  # one id per request
    ],
)
async def test_the_batch_size_histogram_counts_ids_per_res_php_request(
    fake: FakeEngine,
    deps: Deps,
    emulator: RunningEmulator,
    dialect: Dialect,
    requests: int,
    sizes: dict[str, int],
) -> None:
    poller = Poller(_conforms(fake), deps)
    state = provider_state()
    state.client = ProviderClient(
        session=deps.http,
        base_url=emulator.base_url,
        api_key=DEFAULT_API_KEY,
        dialect=dialect,
        bulk_max_ids=2,
    )
    fake.providers[PROVIDER] = state
    keys = [
        put_task(fake, f"t{n}", status={"phase": "Submitted", "providerTaskId": f"70000000{n}"}).key
        for n in range(3)
    ]

    await poller.poll_batch(PROVIDER, keys)

    labels = {"namespace": NS, "provider": "default"}
    registry = deps.metrics.registry
    name = "captchatask_poll_batch_size"
    assert registry.get_sample_value(f"{name}_count", labels) == requests
    assert registry.get_sample_value(f"{name}_sum", labels) == 3
    for bound, count in sizes.items():
        assert registry.get_sample_value(f"{name}_bucket", labels | {"le": bound}) == count
    totals = emulator.summary()["totals"]
    assert totals["res_requests"] == requests


async def test_a_poll_taken_early_that_finds_no_answer_still_polls_at_its_due_time(
    fake: FakeEngine, deps: Deps, emulator: RunningEmulator
) -> None:
    """Early must never cost recovery delay: not ready early is not "not ready when due"."""
    poller = Poller(_conforms(fake), deps)
    state = provider_state()
    client = ProviderClient(
        session=deps.http,
        base_url=emulator.base_url,
        api_key=DEFAULT_API_KEY,
        dialect=Dialect.TWOCAPTCHA,
    )
    state.client = client
    fake.providers[PROVIDER] = state
    spec = {"type": "RecaptchaV2", "siteKey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-"}
    spec["pageURL"] = "https://shop.example.com/login"
    keys = []
    for name in ("due", "early"):
        params = build_submit_params(spec, dialect=Dialect.TWOCAPTCHA, pingback_url=None)
        pid = await client.submit(params)
        keys.append(put_task(fake, name, status={"phase": "Submitted", "providerTaskId": pid}).key)
        poller.polls[keys[-1]] = 1  # past the first poll: no status checkpoint is written
    due_later = T0 + dt.timedelta(seconds=0.6)

    await poller.poll_batch(PROVIDER, keys, early={keys[1]: due_later.timestamp()})

    interval = dt.timedelta(seconds=state.spec.polling.interval)
    assert fake.scheduled[(Kind.POLL, *keys[0])] == T0 + interval
    assert fake.scheduled[(Kind.POLL, *keys[1])] == due_later
    assert poller.polls[keys[1]] == 2


# -- dead-letter requeue -----------------------------------------------------------------------


def letter_body(name: str, *, namespace: str = NS) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "1",
        },
        "spec": {
            "reason": "TaskNotFound",
            "providerTaskId": "7000000001",
            "payload": {"code": "03AF-token", "source": "get"},
            "receivedAt": model.format_time(T0),
        },
    }


async def test_a_new_letter_is_tried_now_and_a_deleted_one_leaves_the_schedule(
    fake: FakeEngine, deps: Deps
) -> None:
    requeuer = Requeuer(_conforms(fake), deps)

    requeuer.observe("ADDED", letter_body("l1"))
    assert fake.scheduled == {(Kind.LETTER, NS, "l1"): T0}
    fake.calls.clear()

    requeuer.observe("DELETED", letter_body("l1"))
    assert fake.scheduled == {}
    assert fake.calls == [
        ("unschedule", str(Kind.LETTER), NS, "l1"),
        ("unschedule", str(Kind.LETTER_TTL), NS, "l1"),
    ]
    assert len(requeuer.letters) == 0


async def test_letters_of_a_namespace_not_served_are_ignored(fake: FakeEngine, deps: Deps) -> None:
    requeuer = Requeuer(_conforms(fake), deps)

    requeuer.observe("ADDED", letter_body("l1", namespace="elsewhere"))

    assert fake.scheduled == {}
    assert len(requeuer.letters) == 0


async def test_a_due_letter_is_attempted_once_at_a_time(fake: FakeEngine, deps: Deps) -> None:
    requeuer = Requeuer(_conforms(fake), deps)
    requeuer.observe("ADDED", letter_body("l1"))

    requeuer.due(Kind.LETTER, (NS, "l1"))
    requeuer.due(Kind.LETTER, (NS, "l1"))

    assert len(fake.spawned) == 1
    assert fake.scheduled[(Kind.LETTER, NS, "l1")] == T0 + policy.BUSY_RETRY


# -- endings -----------------------------------------------------------------------------------


async def test_failing_a_task_that_already_has_an_outcome_writes_nothing(
    fake: FakeEngine, deps: Deps
) -> None:
    record = put_task(fake, "t1", status={"phase": "Solved"})

    await Endings(_conforms(fake), deps).fail(record.ref, "ERROR_CAPTCHA_UNSOLVABLE", "no")

    assert fake.calls == [("remember", "t1"), ("store", "t1")]
    assert fake.counters.status_writes == 0


def test_failure_codes_become_condition_reasons() -> None:
    assert camel("ERROR_CAPTCHA_UNSOLVABLE") == "CaptchaUnsolvable"
    assert camel("DeadlineExceeded") == "DeadlineExceeded"
    assert camel("___") == "Failed"


# -- the timer ---------------------------------------------------------------------------------


async def test_the_timer_dispatches_what_is_due_and_not_what_is_later(fake: FakeEngine) -> None:
    dispatched: list[tuple[Kind, str, str]] = []
    woke = asyncio.Event()

    def dispatch(entries: Iterable[tuple[tuple[Kind, str, str], float]]) -> None:
        dispatched.extend(entry for entry, _due in entries)
        woke.set()

    timer = Timer(clock=fake.clock, dispatch=dispatch, flush=lambda _now: None)
    timer.at(Kind.POLL, (NS, "now"), T0)
    timer.at(Kind.POLL, (NS, "later"), T0 + dt.timedelta(hours=1))
    timer.at(Kind.TTL, (NS, "cancelled"), T0)
    timer.cancel(Kind.TTL, (NS, "cancelled"))
    timer.no_later(Kind.POLL, (NS, "later"), T0 + dt.timedelta(hours=2))  # never postpones

    loop = asyncio.create_task(timer.run())
    try:
        await woke.wait()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    assert dispatched == [(Kind.POLL, NS, "now")]
    assert (
        timer.schedule.due_of((Kind.POLL, NS, "later")) == (T0 + dt.timedelta(hours=1)).timestamp()
    )
