"""Dead-letter scheduling and back-off decisions, with a fake clock and no cluster.

The pure rules live in :mod:`captchatask.deadletters` (back-off, expiry, next action, the
compare-and-set patch); the engine's :class:`~captchatask_operator.requeue.Requeuer` turns them
into entries of the one schedule. The requeuer is exercised here on an engine whose API client
points nowhere: scheduling must not need the API server at all.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from tests.operator.conftest import operator_engine

from captchatask import deadletters, kube, model
from captchatask.deadletters import Action, Backoff, LetterView
from captchatask.model import DeadLetterPhase
from captchatask_operator import settings as settings_module
from captchatask_operator.engine import Engine
from captchatask_operator.index import LetterIndex, TaskIndex
from captchatask_operator.metrics import Metrics
from captchatask_operator.records import TaskRecord
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


def letter_body(
    name: str = "l1",
    *,
    pid: str | None = "7000000001",
    task: str | None = "t1",
    rv: str = "10",
    uid: str = "uid-l1",
    received: dt.datetime = T0,
    status: dict[str, Any] | None = None,
    reason: str = "TaskNotFound",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "reason": reason,
        "payload": {"code": "03AF-token", "source": "get"},
        "receivedAt": model.format_time(received),
    }
    if pid:
        spec["providerTaskId"] = pid
    if task:
        spec["taskRef"] = {"name": task, "uid": "uid-of-the-deleted-task"}
    body: dict[str, Any] = {
        "metadata": {"namespace": NS, "name": name, "uid": uid, "resourceVersion": rv},
        "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


def letter(**kwargs: Any) -> LetterView:
    return LetterView.from_body(letter_body(**kwargs))


def task_record(name: str, *, pid: str | None, uid: str = "uid-t") -> TaskRecord:
    spec: dict[str, Any] = {"type": "Turnstile"}
    if pid:
        spec["providerTaskId"] = pid
    body = {
        "metadata": {
            "namespace": NS,
            "name": name,
            "uid": uid,
            "resourceVersion": "5",
            "creationTimestamp": model.format_time(T0),
        },
        "spec": spec,
    }
    return TaskRecord.from_body(body, now=T0)


# -- back-off and expiry (pure) ----------------------------------------------------------------


def test_retry_delay_doubles_from_the_base_stays_in_the_upper_half_and_is_capped() -> None:
    rng = random.Random(1)
    for attempts in range(1, 12):
        ceiling = min(300.0, 5.0 * 2**attempts)
        for _ in range(50):
            delay = deadletters.retry_delay(attempts, rng=rng)
            assert ceiling / 2 <= delay <= ceiling
    assert deadletters.retry_delay(10_000, rng=rng) <= 300.0
    assert deadletters.retry_delay(1, rng=rng, base=0.1, cap=0.15) <= 0.15


def test_a_letter_expires_after_max_attempts_or_max_age_naming_its_reason() -> None:
    young = letter()
    assert deadletters.expiry_reason(young, attempts=2, now=T0, max_attempts=3) is None
    by_count = deadletters.expiry_reason(young, attempts=3, now=T0, max_attempts=3)
    assert by_count == "no matching task after 3 attempts (TaskNotFound)"
    old_enough = T0 + dt.timedelta(hours=24)
    by_age = deadletters.expiry_reason(young, attempts=1, now=old_enough)
    assert by_age is not None
    assert "within 1 day" in by_age
    assert "TaskNotFound" in by_age


def test_a_redrive_restarts_the_age_clock() -> None:
    redriven_at = T0 + dt.timedelta(hours=30)
    redriven = letter(status={"phase": "Pending", "redrivenAt": model.format_time(redriven_at)})
    later = redriven_at + dt.timedelta(hours=1)

    assert redriven.born == redriven_at
    assert deadletters.expiry_reason(redriven, attempts=1, now=later) is None
    assert deadletters.expiry_reason(letter(), attempts=1, now=later) is not None


def test_next_action_per_phase() -> None:
    new = deadletters.next_action(letter(), now=T0)
    assert (new.action, new.at) == (Action.ATTEMPT, T0)
    later = T0 + dt.timedelta(seconds=40)
    waiting = letter(status={"phase": "Pending", "nextAttemptAt": model.format_time(later)})
    assert deadletters.next_action(waiting, now=T0).at == later
    requeued = letter(status={"phase": "Requeued", "requeuedAt": model.format_time(T0)})
    ttl = dt.timedelta(minutes=5)
    assert deadletters.next_action(requeued, now=T0, requeued_ttl=ttl) == deadletters.NextAction(
        Action.DELETE, T0 + ttl
    )
    expired = letter(status={"phase": "Expired"})
    assert deadletters.next_action(expired, now=T0).action is Action.NONE


def test_the_status_patch_pins_uid_and_version_and_drops_stale_fields() -> None:
    pending = letter(
        rv="42",
        status={
            "phase": "Pending",
            "attempts": 2,
            "nextAttemptAt": model.format_time(T0),
            "redrivenAt": model.format_time(T0),
        },
    )

    ops = deadletters.status_patch(pending, {"phase": "Requeued", "attempts": 3})

    assert ops[0] == {"op": "test", "path": "/metadata/uid", "value": "uid-l1"}
    assert ops[1] == {"op": "test", "path": "/metadata/resourceVersion", "value": "42"}
    assert ops[2]["value"] == {
        "phase": "Requeued",
        "attempts": 3,
        "redrivenAt": model.format_time(T0),
    }


# -- indexes ------------------------------------------------------------------------------------


def test_the_task_index_names_candidates_by_name_then_by_provider_task_id() -> None:
    index = TaskIndex()
    index.put(task_record("t1", pid=None))
    index.put(task_record("adopted", pid="7000000001"))
    index.put(task_record("other", pid="7000000002"))

    assert index.candidates(NS, name="t1", provider_task_id="7000000001") == ["t1", "adopted"]
    assert index.candidates(NS, name="gone", provider_task_id=None) == []
    assert index.candidates("elsewhere", name="t1", provider_task_id="7000000001") == []
    index.pop((NS, "adopted"))
    assert index.candidates(NS, name=None, provider_task_id="7000000001") == []


def test_the_letter_index_finds_pending_letters_waiting_for_a_task() -> None:
    index = LetterIndex()
    index.put(letter(name="a", pid="1", task="t1"))
    index.put(letter(name="b", pid="2", task=None))
    index.put(letter(name="c", pid="2", task=None, status={"phase": "Expired"}))

    assert index.waiting_for(NS, name="t1", provider_task_id=None) == [(NS, "a")]
    assert index.waiting_for(NS, name="zz", provider_task_id="2") == [(NS, "b")]
    assert index.counts() == {
        (NS, "TaskNotFound", "Pending"): 2,
        (NS, "TaskNotFound", "Expired"): 1,
    }


# -- the requeuer on the engine's schedule (fake clock, no API calls) ---------------------------


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, FakeClock]]:
    clock = FakeClock()
    settings = settings_module.parse(
        ["--namespace", NS, "--dead-letter-requeued-ttl-seconds", "300"], {}
    )
    async with aiohttp.ClientSession() as session:
        client = kube.KubeClient(kube.KubeConfig(server="https://127.0.0.1:9"), session)
        yield (
            operator_engine(client, session, settings, clock=clock),
            clock,
        )


def due(engine: Engine, kind: Kind, name: str) -> dt.datetime | None:
    stamp = engine.schedule.due_of((kind, NS, name))
    return None if stamp is None else dt.datetime.fromtimestamp(stamp, dt.UTC)


async def test_a_new_letter_is_tried_now_and_a_retried_one_at_its_next_attempt(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    eng.requeuer.observe("ADDED", letter_body(name="new"))
    later = T0 + dt.timedelta(seconds=40)
    eng.requeuer.observe(
        "ADDED",
        letter_body(
            name="waiting",
            uid="uid-w",
            status={"phase": "Pending", "attempts": 1, "nextAttemptAt": model.format_time(later)},
        ),
    )

    assert due(eng, Kind.LETTER, "new") == clock.now
    assert due(eng, Kind.LETTER, "waiting") == later
    assert due(eng, Kind.LETTER_TTL, "new") is None


async def test_a_task_that_appears_with_the_provider_id_wakes_its_letter(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    later = T0 + dt.timedelta(minutes=4)
    eng.requeuer.observe(
        "ADDED",
        letter_body(
            task=None,
            status={"phase": "Pending", "attempts": 3, "nextAttemptAt": model.format_time(later)},
        ),
    )
    clock.advance(10)
    unrelated = task_record("unrelated", pid="999")
    eng.tasks.put(unrelated)
    eng.requeuer.task_seen(unrelated, None)
    assert due(eng, Kind.LETTER, "l1") == later

    adopted = task_record("adopted", pid="7000000001")
    eng.tasks.put(adopted)
    eng.requeuer.task_seen(adopted, None)

    assert due(eng, Kind.LETTER, "l1") == clock.now
    again = task_record("adopted", pid="7000000001")
    clock.advance(1)
    eng.requeuer.task_seen(again, adopted)  # same id as before: nothing new to try
    assert due(eng, Kind.LETTER, "l1") == clock.now - dt.timedelta(seconds=1)


async def test_after_a_restart_a_letter_whose_task_is_indexed_is_tried_at_once(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    later = T0 + dt.timedelta(minutes=4)
    status = {"phase": "Pending", "attempts": 3, "nextAttemptAt": model.format_time(later)}
    eng.requeuer.store(letter_body(name="has-task", status=status))
    eng.requeuer.store(letter_body(name="no-task", uid="u2", pid="5", task="nope", status=status))
    eng.tasks.put(task_record("t1", pid=None))

    eng.requeuer.resume()

    assert due(eng, Kind.LETTER, "has-task") == clock.now
    assert due(eng, Kind.LETTER, "no-task") == later


async def test_requeued_letters_are_deleted_after_the_ttl_and_expired_ones_are_left_alone(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, clock = engine
    eng.requeuer.observe("ADDED", letter_body(name="l1", rv="10"))
    eng.requeuer.observe(
        "MODIFIED",
        letter_body(
            name="l1", rv="11", status={"phase": "Requeued", "requeuedAt": model.format_time(T0)}
        ),
    )
    eng.requeuer.observe(
        "ADDED", letter_body(name="x", uid="ux", status={"phase": "Expired", "attempts": 12})
    )

    assert due(eng, Kind.LETTER, "l1") is None
    assert due(eng, Kind.LETTER_TTL, "l1") == T0 + dt.timedelta(seconds=300)
    assert due(eng, Kind.LETTER, "x") is None
    assert due(eng, Kind.LETTER_TTL, "x") is None

    # A human redrives the expired letter: it is tried right away.
    clock.advance(60)
    redriven = deadletters.redrive_status(clock.now)
    eng.requeuer.observe("MODIFIED", letter_body(name="x", uid="ux", rv="20", status=redriven))
    assert due(eng, Kind.LETTER, "x") == clock.now


async def test_a_late_watch_event_does_not_resurrect_an_older_status(
    engine: tuple[Engine, FakeClock],
) -> None:
    eng, _clock = engine
    requeued = {"phase": "Requeued", "requeuedAt": model.format_time(T0)}
    eng.requeuer.observe("MODIFIED", letter_body(rv="30", status=requeued))
    eng.requeuer.observe("MODIFIED", letter_body(rv="29", status={"phase": "Pending"}))

    view = eng.requeuer.letters.get((NS, "l1"))
    assert view is not None
    assert view.phase is DeadLetterPhase.REQUEUED
    assert due(eng, Kind.LETTER, "l1") is None


async def test_a_deleted_letter_leaves_the_schedule(engine: tuple[Engine, FakeClock]) -> None:
    eng, _clock = engine
    eng.requeuer.observe("ADDED", letter_body())
    eng.requeuer.observe("DELETED", letter_body())

    assert due(eng, Kind.LETTER, "l1") is None
    assert len(eng.requeuer.letters) == 0


# -- settings and metrics -------------------------------------------------------------------------


def test_dead_letter_settings_default_to_the_documented_policy_and_take_flags() -> None:
    defaults = settings_module.parse(["-A"], {})
    tuned = settings_module.parse(
        ["-A", "--dead-letter-max-attempts", "3", "--dead-letter-retry-base-seconds", "0.2"],
        {"CAPTCHATASK_DEAD_LETTER_REQUEUED_TTL_SECONDS": "60"},
    )

    from captchatask_operator.requeue import backoff_of  # noqa: PLC0415

    assert backoff_of(defaults) == Backoff()
    assert defaults.dead_letter_requeued_ttl_seconds == 3600
    assert (tuned.dead_letter_max_attempts, tuned.dead_letter_retry_base_seconds) == (3, 0.2)
    assert tuned.dead_letter_requeued_ttl_seconds == 60
    with pytest.raises(SystemExit):
        settings_module.parse(["-A", "--dead-letter-max-attempts", "0"], {})
    with pytest.raises(SystemExit):
        settings_module.parse(["-A", "--dead-letter-retry-base-seconds", "600"], {})


def test_dead_letter_series_exist_at_zero_for_every_reason_phase_and_outcome() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sample = registry.get_sample_value

    metrics.ensure_namespace("shop")
    for reason in model.DeadLetterReason:
        for phase in model.DeadLetterPhase:
            labels = {"namespace": "shop", "reason": reason, "phase": phase}
            assert sample("captchatask_dead_letters", labels) == 0
    for outcome in deadletters.RequeueOutcome:
        labels = {"namespace": "shop", "outcome": outcome}
        assert sample("captchatask_dead_letter_requeues_total", labels) == 0

    metrics.set_dead_letter_counts({("shop", "TaskNotFound", "Pending"): 2})
    metrics.set_dead_letter_counts({("shop", "TaskNotFound", "Expired"): 2})
    pending = {"namespace": "shop", "reason": "TaskNotFound", "phase": "Pending"}
    expired = {**pending, "phase": "Expired"}
    assert sample("captchatask_dead_letters", pending) == 0
    assert sample("captchatask_dead_letters", expired) == 2
    # A namespace whose letters appear is pre-created whole, and each namespace counts its own.
    metrics.set_dead_letter_counts({("blog", "TaskRecreated", "Pending"): 1})
    assert sample("captchatask_dead_letters", {**pending, "namespace": "blog"}) == 0
    assert sample("captchatask_dead_letters", expired) == 0
