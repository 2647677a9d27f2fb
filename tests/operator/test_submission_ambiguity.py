"""At most one paid provider task per CaptchaTask, unless a reply *and* its pingback are lost.

Real kube-apiserver, emulator, pingback receiver and operator process (see ``conftest.py``):

* an ``in.php`` whose reply was lost after the task was created (the emulator's "task
  created, reply lost" fault) is treated like a crash after ``in.php``: the operator waits the
  pingback grace, and the task's own pingback (its URL is signed for this task) records the
  result and the provider id we never learned;
* only when no pingback comes within the grace is the task submitted once more, with one
  ``SubmissionAmbiguous`` and one ``Resubmitting`` Warning;
* a provider id that ``in.php`` returned survives a failed ``Submitted`` write (API server
  away): it is kept and written once the API server is back, never resubmitted.

Provider tasks per CaptchaTask are counted from the emulator's own records.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.operator.conftest import operator_engine, serving

from captchatask import kube, model, testbed
from captchatask.decision import Outcome, Result
from captchatask.emulator.config import EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.model import DeliveredBy, TaskRef
from captchatask.provider import codes
from captchatask_operator import policy
from captchatask_operator import settings as settings_module
from captchatask_operator.actions import ProviderState
from captchatask_operator.engine import Engine
from captchatask_operator.policy import StepKind
from captchatask_operator.queueing import ProviderQueue
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.schedule import Kind

#: A solve slower than the 5 s an old-style "retry later" would wait, so that a premature
#: resubmission shows up as a second provider task before the pingback of the first arrives.
SLOW_SOLVE = EmulatorConfig(seed=11, threads=50, solve_times={"recaptcha_v2": (8.0, 8.0)})
FAST_SOLVE = EmulatorConfig(seed=12, threads=50, solve_times={"recaptcha_v2": (0.5, 0.5)})


def _status(task: dict[str, Any]) -> dict[str, Any]:
    return dict(task.get("status") or {})


def _ref(body: dict[str, Any]) -> TaskRef:
    meta = body["metadata"]
    return TaskRef(meta["namespace"], meta["name"], meta["uid"])


async def test_a_lost_in_php_reply_is_healed_by_the_pingback_without_a_second_task(
    harness: Any, receiver: Any
) -> None:
    async with run_emulator(SLOW_SOLVE) as emulator:
        emulator.lose_in_replies(1, mode="502")
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=20)
        operator = harness.start_operator()
        await harness.started(operator)
        created = await harness.task("lost-reply")

        tasks = await harness.wait_terminal(1)

        status = _status(tasks[0])
        [provider_task] = emulator.tasks()
        assert provider_task.reply_lost == "502"
        assert status["phase"] == "Solved"
        assert status["deliveredBy"] == "pingback"
        assert status["providerTaskId"] == provider_task.task_id
        assert status["solution"]["token"] == provider_task.token
        assert harness.per_uid(emulator) == {created["metadata"]["uid"]: 1}
        ambiguous = await harness.events("SubmissionAmbiguous")
        assert [event["type"] for event in ambiguous] == ["Warning"]
        assert await harness.events("SubmitRetry") == []
        assert await harness.events("Resubmitting") == []
        assert operator.metric("captchatask_submissions_total", outcome="ambiguous") == 1


async def test_a_lost_reply_without_a_pingback_is_resubmitted_once_after_the_grace(
    harness: Any, receiver: Any
) -> None:
    grace = 2
    async with run_emulator(FAST_SOLVE) as emulator:
        emulator.lose_in_replies(1, mode="drop")
        emulator.set_faults(pingback_drop_rate=1.0)
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=grace)
        operator = harness.start_operator()
        await harness.started(operator)
        created = await harness.task("lost-twice")

        tasks = await harness.wait_terminal(1)

        status = _status(tasks[0])
        assert status["phase"] == "Solved"
        assert status["deliveredBy"] == "poll"
        assert harness.per_uid(emulator) == {created["metadata"]["uid"]: 2}
        assert [t.reply_lost for t in emulator.tasks()].count("drop") == 1
        submission = status["submission"]
        assert submission["attempts"] == 2
        # The resubmission waited the whole grace after the ambiguous failure (ledger times).
        ambiguous_at = model.parse_time(submission["ambiguousAt"])
        intent_at = model.parse_time(submission["intentAt"])
        assert ambiguous_at is not None
        assert intent_at is not None
        assert intent_at - ambiguous_at >= dt.timedelta(seconds=grace)
        assert len(await harness.events("SubmissionAmbiguous")) == 1
        assert len(await harness.events("Resubmitting")) == 1
        assert operator.metric("captchatask_submissions_total", outcome="ambiguous") == 1


async def test_the_ledger_records_a_pingback_for_a_task_whose_submission_is_ambiguous(
    harness: Any,
) -> None:
    """The signed URL names the task: its result is recorded even with no provider id on file."""
    created = await harness.task("ambiguous")
    now = model.format_time(dt.datetime.now(dt.UTC))
    await harness.set_status(
        "ambiguous",
        {
            "phase": "Pending",
            "submission": {
                "intentAt": now,
                "ambiguousAt": now,
                "attempts": 1,
                "lastError": "HTTP_5XX: provider answered with an HTTP 5xx page",
            },
        },
    )
    result = Result.solved(
        token="03A-answer", delivered_by=DeliveredBy.PINGBACK, provider_task_id="4242424242"
    )

    recorded = await harness.ledger.record(_ref(created), result)

    assert recorded.outcome is Outcome.RECORDED
    status = _status(await harness.get("ambiguous"))
    assert status["phase"] == "Solved"
    assert status["providerTaskId"] == "4242424242"
    assert status["solution"]["token"] == "03A-answer"


class HoldingProxy:
    """A real HTTP proxy to the emulator that holds the first ``in.php`` reply until released.

    The reply (with the new provider id) is already generated when it is held, so the test
    can take the API server away exactly between ``in.php`` and the ``Submitted`` write.
    """

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._hold_next = True

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "")}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            status, payload = upstream.status, await upstream.read()
            content_type = upstream.headers.get("Content-Type", "text/plain")
        if request.path == "/in.php" and self._hold_next:
            self._hold_next = False
            self.held.set()
            await self.release.wait()
        return web.Response(status=status, body=payload, headers={"Content-Type": content_type})


@pytest.fixture
async def holding_proxy() -> AsyncIterator[tuple[RunningEmulator, HoldingProxy, str]]:
    async with run_emulator(FAST_SOLVE) as emulator, aiohttp.ClientSession() as session:
        proxy = HoldingProxy(emulator.base_url, session)
        async with serving(proxy.handle) as url:
            try:
                yield emulator, proxy, url
            finally:
                proxy.release.set()  # a held in.php must not outlive the server


async def test_a_provider_id_survives_a_failed_submitted_write_and_is_not_resubmitted(
    harness: Any,
    control_plane: testbed.ControlPlane,
    holding_proxy: tuple[RunningEmulator, HoldingProxy, str],
) -> None:
    emulator, proxy, proxy_url = holding_proxy
    await harness.secret()
    # Poll-only (no pingback): nothing but the operator's own write can keep the id.
    await harness.provider(SimpleNamespace(base_url=proxy_url))
    operator = harness.start_operator("--intent-grace-seconds", "1")
    await harness.started(operator)
    await harness.task("kept")
    await asyncio.wait_for(proxy.held.wait(), timeout=30)

    await asyncio.to_thread(control_plane.stop_apiserver, grace=2.0)
    try:
        proxy.release.set()

        async def write_failed() -> bool:
            log = operator.output()
            return "kept" in log and ("postponed" in log or "not written yet" in log)

        await harness.wait_until(write_failed, what="the Submitted write to fail")
    finally:
        await asyncio.to_thread(control_plane.start_apiserver)

    tasks = await harness.wait_terminal(1, timeout=60)

    status = _status(tasks[0])
    [provider_task] = emulator.tasks()
    assert status["phase"] == "Solved"
    assert status["providerTaskId"] == provider_task.task_id
    assert status["submission"]["attempts"] == 1
    assert emulator.summary()["totals"]["in_requests"] == 1
    assert await harness.events("Resubmitting") == []


# -- the pure rule ------------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def _record(submission: dict[str, Any]) -> TaskRecord:
    body = {
        "metadata": {
            "namespace": "ns",
            "name": "t",
            "uid": "0f0e0d0c-0b0a-4909-8807-060504030201",
            "resourceVersion": "7",
            "generation": 1,
            "creationTimestamp": model.format_time(T0),
        },
        "spec": {"type": "RecaptchaV2", "deadlineSeconds": 600},
        "status": {"phase": "Pending", "submission": submission},
    }
    return TaskRecord.from_body(body, now=T0)


def _step(record: TaskRecord, seconds: float) -> policy.Step:
    provider = ProviderSpec.from_body(
        {
            "metadata": {"namespace": "ns", "name": "p"},
            "spec": {
                "apiKeySecretRef": {"name": "s"},
                "pingback": {"publicURL": "https://hooks.example"},
                "polling": {"callbackTimeoutSeconds": 120},
            },
        }
    )
    return policy.submission_step(
        record,
        provider=provider,
        provider_ready=True,
        provider_reason="Ready",
        now=T0 + dt.timedelta(seconds=seconds),
        max_attempts=3,
        poll_only_grace=30.0,
    )


def test_an_ambiguous_failure_waits_the_whole_pingback_grace_from_the_failure() -> None:
    record = _record(
        {
            "intentAt": model.format_time(T0),
            "ambiguousAt": model.format_time(T0 + dt.timedelta(seconds=30)),
            "attempts": 1,
        }
    )

    assert record.unresolved_intent
    waiting = _step(record, 149.0)
    assert waiting.kind is StepKind.WAIT
    assert waiting.at == T0 + dt.timedelta(seconds=150)
    again = _step(record, 150.0)
    assert again.kind is StepKind.SUBMIT
    assert again.resubmit


@pytest.mark.parametrize(
    ("code", "ambiguous"),
    [
        (codes.TRANSPORT_ERROR, True),
        (codes.HTTP_5XX, True),
        (codes.UNPARSEABLE_REPLY, True),
        (codes.CONNECT_ERROR, False),
        ("ERROR_NO_SLOT_AVAILABLE", False),
        ("ERROR_SERVER_ERROR", False),
    ],
)
def test_only_failures_that_may_have_reached_the_provider_are_ambiguous(
    code: str, ambiguous: bool
) -> None:
    classification = codes.classify(code, dialect=codes.Dialect.CAPTCHAAI, endpoint="in")
    assert policy.is_ambiguous(classification) is ambiguous


def engine_clock() -> dt.datetime:
    return T0


async def test_a_submission_postponed_by_an_unreachable_api_server_gives_its_slot_back() -> None:
    """The retry must be able to queue the task again, or it is never submitted at all."""
    settings = settings_module.parse(["--namespace", "ns"], {})
    async with aiohttp.ClientSession() as session:
        # A closed port: every API call is refused, exactly as while kube-apiserver is stopped.
        client = kube.KubeClient(kube.KubeConfig(server="https://127.0.0.1:9"), session)
        engine = operator_engine(client, session, settings, clock=engine_clock)
        record = _record({})
        engine.tasks.put(record)
        queue = engine.queues.setdefault(record.provider_key, ProviderQueue())
        queue.wait(record.key, record.created_at)
        assert queue.admit(None) == [record.key]

        assert engine.run(record.key, engine.submitter.submit(record), submitting=True)
        while record.key in engine.busy:  # noqa: ASYNC110 - the engine exposes no "done" event
            await asyncio.sleep(0.01)

        assert record.key not in queue.in_flight
        queue.wait(record.key, record.created_at)
        assert record.key in queue
        engine.timer.schedule.clear()


async def test_after_an_outage_an_unresolved_intent_waits_for_the_receivers_to_catch_up() -> None:
    """The chaos run's sequence: an outage, then an in.php whose reply was lost.

    The operator's last failed call was 15 s into a kube-apiserver outage; the task's intent
    and its ambiguous in.php came 2 s later. Its pingback reached a receiver that had not yet
    noticed the API server's return (spooled behind the outage's backlog, or refused while
    the spool was at its bound): it is recorded only once the receivers have caught up, which
    takes about as long as the outage built its backlog. The intent must wait that long, not
    just the callback timeout from the ambiguous failure, or the task is paid for twice.
    """
    settings = settings_module.parse(["--namespace", "ns"], {})
    now = [T0]

    def clock() -> dt.datetime:
        return now[0]

    async with aiohttp.ClientSession() as session:
        # A closed port: every API call is refused, exactly as while kube-apiserver is stopped.
        client = kube.KubeClient(kube.KubeConfig(server="https://127.0.0.1:9"), session)
        engine = operator_engine(client, session, settings, clock=clock)
        waiting = _record({})
        for seconds in (0.0, 15.0):  # the first and the last failed call of the outage
            now[0] = T0 + dt.timedelta(seconds=seconds)
            assert engine.run(waiting.key, engine.submitter.submit(waiting))
            while waiting.key in engine.busy:  # noqa: ASYNC110 - the engine exposes no "done" event
                await asyncio.sleep(0.01)
        engine.timer.schedule.clear()

        provider = ProviderSpec.from_body(
            {
                "metadata": {"namespace": "ns", "name": "default"},
                "spec": {
                    "apiKeySecretRef": {"name": "s"},
                    "pingback": {"publicURL": "https://hooks.example"},
                    "polling": {"callbackTimeoutSeconds": 4},
                },
            }
        )
        engine.providers[provider.key] = ProviderState(provider, ready=True, checked=True)
        after = model.format_time(T0 + dt.timedelta(seconds=17))
        lost = _record({"intentAt": after, "ambiguousAt": after, "attempts": 1})
        assert lost.provider_key == provider.key
        now[0] = T0 + dt.timedelta(seconds=22)  # past ambiguousAt + callbackTimeoutSeconds
        engine._consider_submission(lost)

        due = engine.schedule.due_of((Kind.SUBMIT, *lost.key))
        # The grace runs from the last failure and is stretched by the outage's length.
        assert due == (T0 + dt.timedelta(seconds=15 + 4 + 15)).timestamp()
        engine.timer.schedule.clear()


@contextlib.asynccontextmanager
async def _active_engine(
    control_plane: testbed.ControlPlane, namespace: str
) -> AsyncIterator[Engine]:
    """An active operator engine on the real API server with nothing due: an idle operator."""
    config = kube.load_config(str(control_plane.kubeconfig))
    settings = settings_module.parse(["--namespace", namespace], {})
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        engine = operator_engine(kube.KubeClient(config, session), session, settings)
        await engine.activate()
        try:
            yield engine
        finally:
            await engine.deactivate()


async def test_an_outage_the_operator_had_nothing_to_write_in_is_still_noticed(
    control_plane: testbed.ControlPlane, namespace: str
) -> None:
    """An idle operator must know the API server was away, or the grace above is not stretched.

    In the chaos run no action of the operator's failed during the outage (nothing was due),
    and the ``in.php`` replies lost right after it were repeated while their pingbacks still
    waited in a receiver's spool.
    """
    async with _active_engine(control_plane, namespace) as engine:

        def last_failure() -> dt.datetime | None:
            return engine.ledger_unavailable_at

        assert last_failure() is None
        await asyncio.to_thread(control_plane.stop_apiserver, grace=2.0)
        try:
            for _ in range(600):  # a bound on failure (60 s), not a timing assertion
                if last_failure() is not None:
                    break
                await asyncio.sleep(0.1)
            assert last_failure() is not None, "the outage went unnoticed"
        finally:
            await asyncio.to_thread(control_plane.start_apiserver)
        last = last_failure()
        assert last is not None
        assert engine.ledger_unavailable_since is not None
        assert engine.ledger_unavailable_since <= last


async def test_the_time_the_api_server_answered_between_two_outages_does_not_stretch_the_grace(
    control_plane: testbed.ControlPlane, namespace: str
) -> None:
    """Two outages close together are one backlog for the receivers, but not one long outage.

    The grace of an unresolved intent is stretched by the outage's length (the receivers'
    backlog grows with it). In a chaos run a 19 s outage and a 44 s one, 11 s apart, were
    measured as one 74 s outage: the 11 s in which the API server answered (and the receivers
    drained their spools) held back the resubmission of six tasks whose ``in.php`` reply was
    lost. Only the time the API server was away may count.
    """
    async with _active_engine(control_plane, namespace) as engine:
        # The two outages are one by the rule however slowly this machine restarts the API
        # server: what is tested is how their length is counted, not where the gap's edge is.
        engine.outage_gap = dt.timedelta(minutes=10)

        async def away_until_noticed(after: dt.datetime | None) -> dt.datetime:
            """Stop kube-apiserver until the engine notes a failure later than ``after``."""
            # Waits on the probe's wake-up from before the restart: no race with the probe.
            back = asyncio.ensure_future(engine.ledger_back(120.0))
            await asyncio.to_thread(control_plane.stop_apiserver, grace=2.0)
            try:
                for _ in range(600):  # a bound on failure (60 s), not a timing assertion
                    last = engine.ledger_unavailable_at
                    if last is not None and (after is None or last > after):
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("the outage went unnoticed")
            finally:
                await asyncio.to_thread(control_plane.start_apiserver)
            assert await back, "the probe did not see the API server answer again"
            return engine.clock()

        answered = await away_until_noticed(None)
        first_since = engine.ledger_unavailable_since
        first_last = engine.ledger_unavailable_at
        assert first_since is not None
        assert first_last is not None
        await asyncio.sleep(1.0)  # the API server answers for a while
        stopped_again = engine.clock()
        await away_until_noticed(first_last)

        since, last = engine.ledger_unavailable_since, engine.ledger_unavailable_at
        assert since is not None
        assert last is not None
        # The outage's length is what the API server was away: at most the whole span less
        # the time between the probe's answer and the second stop.
        assert last - since <= (last - first_since) - (stopped_again - answered)
