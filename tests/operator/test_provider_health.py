"""Provider health (BUG-1), the past-deadline gauge and poll batching (BENCH-6), fake clock.

The engine's API client points nowhere: a transient check failure must be handled without the
API server (its ``lastError`` write is best effort), and the gauge is computed from the index
alone. The whole-stack reproduction of BUG-1 is
``tests/chaos/test_chaos_regressions.py::test_a_short_burst_of_html_502_on_res_php_...``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.operator.conftest import operator_engine

from captchatask import kube, model
from captchatask.provider import codes
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Classification, Dialect
from captchatask_operator import policy
from captchatask_operator import settings as settings_module
from captchatask_operator.actions import ProviderState
from captchatask_operator.engine import Engine
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.schedule import Kind

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
NS = "shop"


class FakeClock:
    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def classification(code: str) -> Classification:
    return codes.classify(code, endpoint="res", dialect=Dialect.CAPTCHAAI)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, FakeClock]]:
    clock = FakeClock()
    settings = settings_module.parse(
        ["--namespace", NS, "--provider-unreachable-after", "3", "--provider-retry-seconds", "10"],
        {},
    )
    async with aiohttp.ClientSession() as session:
        client = kube.KubeClient(kube.KubeConfig(server="https://127.0.0.1:9"), session)
        yield (
            operator_engine(client, session, settings, clock=clock),
            clock,
        )


def ready_provider(eng: Engine) -> ProviderState:
    spec = ProviderSpec.from_body(
        {
            "metadata": {"namespace": NS, "name": "default", "uid": "uid-p"},
            "spec": {"dialect": "captchaai", "apiKeySecretRef": {"name": "s"}},
        }
    )
    state = ProviderState(spec=spec, ready=True, reason="Ready", checked=True)
    eng.providers[spec.key] = state
    eng.metrics.ensure_provider(*spec.key)
    eng.metrics.provider_ready.labels(*spec.key).set(1)
    return state


def recheck_in(eng: Engine, clock: FakeClock, state: ProviderState) -> float | None:
    stamp = eng.schedule.due_of((Kind.PROVIDER, *state.spec.key))
    return None if stamp is None else stamp - clock.now.timestamp()


# -- pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [codes.HTTP_5XX, codes.TRANSPORT_ERROR, codes.UNPARSEABLE_REPLY])
def test_transient_check_failures_are_marked_transient(code: str) -> None:
    verdict = policy.provider_verdict(Dialect.CAPTCHAAI, error=classification(code))

    assert verdict.transient
    assert verdict.reason is policy.ProviderReason.UNREACHABLE


def test_a_wrong_key_is_not_transient() -> None:
    verdict = policy.provider_verdict(
        Dialect.CAPTCHAAI, error=classification("ERROR_WRONG_USER_KEY")
    )

    assert not verdict.transient
    assert verdict.reason is policy.ProviderReason.INVALID_KEY


def test_transient_rechecks_back_off_from_one_second_up_to_the_retry_interval() -> None:
    delays = [policy.transient_recheck_delay(n, cap=10.0) for n in range(1, 7)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert not policy.declares_unreachable(2, unreachable_after=3)
    assert policy.declares_unreachable(3, unreachable_after=3)


# -- the provider checks on the engine (fake clock, no API server) ------------------------------


async def test_a_short_burst_of_transient_failures_keeps_the_provider_ready(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    state = ready_provider(eng)
    transient = policy.provider_verdict(Dialect.CAPTCHAAI, error=classification(codes.HTTP_5XX))

    await eng.checks.apply_verdict(state, transient)
    first = recheck_in(eng, clock, state)
    clock.advance(1)
    await eng.checks.apply_verdict(state, transient)
    second = recheck_in(eng, clock, state)

    assert (state.ready, state.reason, state.transient_failures) == (True, "Ready", 2)
    assert (first, second) == (1.0, 2.0)
    sample = eng.metrics.registry.get_sample_value
    assert sample("captchatask_provider_ready", {"namespace": NS, "provider": "default"}) == 1


async def test_an_answer_resets_the_count_of_transient_failures(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, _clock = engine
    state = ready_provider(eng)
    transient = policy.provider_verdict(Dialect.CAPTCHAAI, error=classification(codes.HTTP_5XX))
    await eng.checks.apply_verdict(state, transient)
    await eng.checks.apply_verdict(state, transient)

    state.transient_failures = 0  # what a check with an answer does (its write needs the API)
    await eng.checks.apply_verdict(state, transient)

    assert state.ready
    assert state.transient_failures == 1


async def test_the_nth_transient_failure_in_a_row_declares_the_provider_unreachable(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, _clock = engine
    state = ready_provider(eng)
    transient = policy.provider_verdict(
        Dialect.CAPTCHAAI, error=classification(codes.TRANSPORT_ERROR)
    )
    await eng.checks.apply_verdict(state, transient)
    await eng.checks.apply_verdict(state, transient)

    with pytest.raises(kube.KubeError):  # the status write (no API server here) comes after
        await eng.checks.apply_verdict(state, transient)

    assert (state.ready, state.reason) == (False, policy.ProviderReason.UNREACHABLE)


async def test_an_unchecked_provider_stays_unchecked_on_a_transient_failure(
    engine: tuple[Engine, FakeClock],
) -> None:
    """Its tasks keep waiting for the first answer instead of being parked as not Ready."""
    eng, clock = engine
    state = ready_provider(eng)
    state.ready, state.checked, state.reason = False, False, "Unknown"
    transient = policy.provider_verdict(Dialect.CAPTCHAAI, error=classification(codes.HTTP_5XX))

    await eng.checks.apply_verdict(state, transient)

    assert not state.checked
    assert state.reason == "Unknown"
    assert recheck_in(eng, clock, state) == 1.0


# -- captchatask_tasks_past_deadline -----------------------------------------------------------


def task(name: str, *, deadline_seconds: int, phase: str | None = None) -> TaskRecord:
    body: dict[str, Any] = {
        "metadata": {
            "namespace": NS,
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "5",
            "creationTimestamp": model.format_time(T0),
        },
        "spec": {"type": "Turnstile", "deadlineSeconds": deadline_seconds},
        "status": {"phase": phase} if phase else {},
    }
    return TaskRecord.from_body(body, now=T0)


async def test_the_past_deadline_gauge_counts_unfinished_tasks_past_their_deadline(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    eng.metrics.ensure_provider(NS, "default")
    eng.tasks.put(task("late-pending", deadline_seconds=60))
    eng.tasks.put(task("late-submitted", deadline_seconds=60, phase="Submitted"))
    eng.tasks.put(task("late-but-solved", deadline_seconds=60, phase="Solved"))
    eng.tasks.put(task("in-time", deadline_seconds=600))
    sample = eng.metrics.registry.get_sample_value
    labels = {"namespace": NS, "provider": "default"}

    eng.refresh_gauges()
    before = sample("captchatask_tasks_past_deadline", labels)
    clock.advance(61)
    eng.refresh_gauges()
    after = sample("captchatask_tasks_past_deadline", labels)
    for name in ("late-pending", "late-submitted"):
        eng.tasks.pop((NS, name))
    eng.refresh_gauges()
    cleared = sample("captchatask_tasks_past_deadline", labels)

    assert (before, after, cleared) == (0, 2, 0)


# -- adaptive poll batching (BENCH-6) ----------------------------------------------------------


def provider_with_client(
    eng: Engine, session: aiohttp.ClientSession, *, dialect: Dialect, bulk_max_ids: int = 3
) -> ProviderState:
    state = ready_provider(eng)
    state.client = ProviderClient(
        session=session,
        base_url="http://127.0.0.1:9",
        api_key="k",
        dialect=dialect,
        bulk_max_ids=bulk_max_ids,
    )
    return state


async def test_due_polls_wait_for_later_ones_until_the_oldest_is_late_by_the_window(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    window = eng.settings.poll_batch_window
    async with aiohttp.ClientSession() as session:
        state = provider_with_client(eng, session, dialect=Dialect.TWOCAPTCHA)
        t = clock.now.timestamp()
        eng.poller.collect(state.spec.key, (NS, "a"), due=t)
        eng.poller.collect(state.spec.key, (NS, "b"), due=t + 0.1)

        held_until = eng.poller.flush(t + 0.1)
        held = list(eng.poller.batches[state.spec.key].keys)
        sent_at_deadline = eng.poller.flush(t + window)

    assert held_until == t + window
    assert held == [(NS, "a"), (NS, "b")]
    assert sent_at_deadline is None
    assert eng.poller.batches == {}


async def test_a_full_batch_goes_at_once(engine: tuple[Engine, FakeClock]) -> None:
    eng, clock = engine
    async with aiohttp.ClientSession() as session:
        state = provider_with_client(eng, session, dialect=Dialect.TWOCAPTCHA, bulk_max_ids=3)
        t = clock.now.timestamp()
        for name in ("a", "b", "c"):
            eng.poller.collect(state.spec.key, (NS, name), due=t)

        next_flush = eng.poller.flush(t)

    assert next_flush is None
    assert eng.poller.batches == {}


async def test_polls_of_a_provider_without_bulk_requests_are_not_held_back(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    async with aiohttp.ClientSession() as session:
        state = provider_with_client(eng, session, dialect=Dialect.CAPTCHAAI)
        eng.poller.collect(state.spec.key, (NS, "a"), due=clock.now.timestamp())

        next_flush = eng.poller.flush(clock.now.timestamp())

    assert next_flush is None
    assert eng.poller.batches == {}


def test_pop_due_timed_returns_the_due_times() -> None:
    from captchatask_operator.schedule import Schedule  # noqa: PLC0415

    schedule: Schedule[str] = Schedule()
    schedule.set("a", 10.0)
    schedule.set("b", 5.0)

    assert schedule.pop_due_timed(20.0) == [("b", 5.0), ("a", 10.0)]


def submitted_task(eng: Engine, name: str, *, provider: str = "default") -> TaskRecord:
    """A Submitted task in the index (no provider id: its poll is skipped, no request made)."""
    view = model.TaskView.from_body(
        {
            "metadata": {"namespace": NS, "name": name, "uid": f"uid-{name}"},
            "spec": {"type": "Turnstile", "providerRef": {"name": provider}},
            "status": {"phase": "Submitted"},
        }
    )
    record = TaskRecord.from_view(view, now=T0)
    eng.tasks.put(record)
    return record


async def test_a_batch_that_goes_out_takes_the_providers_polls_due_within_the_window(
    engine: tuple[Engine, FakeClock],
) -> None:
    """Polling a little early costs no request: the ids ride in a request that goes anyway."""
    eng, clock = engine
    window = eng.settings.poll_batch_window
    async with aiohttp.ClientSession() as session:
        state = provider_with_client(eng, session, dialect=Dialect.TWOCAPTCHA, bulk_max_ids=3)
        t = clock.now.timestamp()
        sent_at = t + window
        names = ("a", "soon", "sooner", "full", "beyond")
        for name in names:
            submitted_task(eng, name)
        submitted_task(eng, "elsewhere", provider="other")
        at = {
            "soon": sent_at + 0.5 * window,
            "sooner": sent_at + 0.4 * window,
            "full": sent_at + 0.6 * window,  # a fourth id would need a second request
            "beyond": sent_at + 1.5 * window,
            "elsewhere": sent_at + 0.1 * window,  # another provider's request
        }
        for name, due in at.items():
            eng.schedule_at(Kind.POLL, (NS, name), dt.datetime.fromtimestamp(due, dt.UTC))
        eng.poller.collect(state.spec.key, (NS, "a"), due=t)

        eng.poller.flush(sent_at)

    def still_scheduled(name: str) -> bool:
        return eng.schedule.due_of((Kind.POLL, NS, name)) is not None

    assert eng.poller.batches == {}
    assert not still_scheduled("sooner")
    assert not still_scheduled("soon")
    assert still_scheduled("full")
    assert still_scheduled("beyond")
    assert still_scheduled("elsewhere")
