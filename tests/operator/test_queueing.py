"""Admission to a provider: the maxInFlight cap, oldest first, reserved slots."""

from __future__ import annotations

import datetime as dt

from captchatask_operator.queueing import ProviderQueue

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _at(seconds: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_the_oldest_waiting_tasks_are_admitted_first_up_to_the_cap() -> None:
    queue = ProviderQueue()
    queue.wait(("ns", "c"), _at(3))
    queue.wait(("ns", "a"), _at(1))
    queue.wait(("ns", "b"), _at(2))

    assert queue.admit(2) == [("ns", "a"), ("ns", "b")]
    assert queue.admit(2) == []
    assert queue.waiting_keys() == [("ns", "c")]


def test_a_freed_slot_admits_the_next_task() -> None:
    queue = ProviderQueue()
    queue.occupy(("ns", "running"))
    queue.wait(("ns", "next"), _at(1))

    assert queue.admit(1) == []
    queue.discard(("ns", "running"))
    assert queue.admit(1) == [("ns", "next")]


def test_equal_creation_times_are_ordered_by_name() -> None:
    queue = ProviderQueue()
    for name in ("t2", "t0", "t1"):
        queue.wait(("ns", name), _at(0))

    assert queue.admit(None) == [("ns", "t0"), ("ns", "t1"), ("ns", "t2")]


def test_no_cap_admits_up_to_the_callers_limit() -> None:
    queue = ProviderQueue()
    for i in range(5):
        queue.wait(("ns", f"t{i}"), _at(i))

    assert len(queue.admit(None, limit=3)) == 3
    assert queue.free_slots(None) is None
    assert len(queue) == 2


def test_waiting_is_idempotent_and_ignores_tasks_holding_a_slot() -> None:
    queue = ProviderQueue()
    queue.occupy(("ns", "busy"))
    queue.wait(("ns", "busy"), _at(0))
    queue.wait(("ns", "x"), _at(1))
    queue.wait(("ns", "x"), _at(1))

    assert queue.admit(10) == [("ns", "x")]
    assert queue.in_flight == {("ns", "busy"), ("ns", "x")}


def test_a_removed_task_is_never_admitted() -> None:
    queue = ProviderQueue()
    queue.wait(("ns", "gone"), _at(0))
    queue.discard(("ns", "gone"))

    assert queue.admit(5) == []
