"""The one timer's heap: ordering, rescheduling, lazy deletion, compaction (fake clock)."""

from __future__ import annotations

from captchatask_operator.schedule import Kind, Schedule


def test_due_keys_come_out_earliest_first_and_only_when_due() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("b", 20.0)
    schedule.set("a", 10.0)
    schedule.set("c", 30.0)

    assert schedule.pop_due(9.9) == []
    assert schedule.pop_due(20.0) == ["a", "b"]
    assert schedule.next_due() == 30.0
    assert len(schedule) == 1


def test_rescheduling_keeps_one_live_entry_per_key() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("x", 10.0)
    schedule.set("x", 50.0)

    assert schedule.pop_due(40.0) == []
    assert schedule.pop_due(50.0) == ["x"]
    assert schedule.pop_due(100.0) == []


def test_set_reports_whether_the_timer_must_wake() -> None:
    schedule: Schedule[str] = Schedule()

    assert schedule.set("late", 100.0) is True
    assert schedule.set("later", 200.0) is False
    assert schedule.set("early", 50.0) is True


def test_set_earlier_never_postpones() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("x", 10.0)

    schedule.set_earlier("x", 20.0)
    assert schedule.due_of("x") == 10.0
    schedule.set_earlier("x", 5.0)
    assert schedule.due_of("x") == 5.0


def test_cancelled_keys_never_come_due() -> None:
    schedule: Schedule[tuple[Kind, str, str]] = Schedule()
    key = (Kind.POLL, "ns", "t")
    schedule.set(key, 1.0)
    schedule.cancel(key)

    assert schedule.pop_due(10.0) == []
    assert schedule.next_due() is None


def test_the_heap_is_compacted_when_stale_items_pile_up() -> None:
    schedule: Schedule[int] = Schedule()
    for round_ in range(50):
        for key in range(10):
            schedule.set(key, float(round_ * 10 + key))

    assert len(schedule) == 10
    assert schedule.heap_size <= 2 * 10 + 64 + 1
    assert schedule.pop_due(10_000.0) == list(range(10))


def test_take_due_takes_accepted_keys_due_by_the_horizon_earliest_first_up_to_a_limit() -> None:
    schedule: Schedule[str] = Schedule()
    for key, due in (("p3", 13.0), ("p1", 11.0), ("x", 10.5), ("p2", 12.0), ("p9", 19.0)):
        schedule.set(key, due)
    schedule.set("p1", 11.5)  # rescheduled: its stale item must not be taken twice

    taken = schedule.take_due(15.0, accept=lambda key: key.startswith("p"), limit=2)

    assert taken == [("p1", 11.5), ("p2", 12.0)]
    assert schedule.due_of("p1") is None
    assert schedule.due_of("p2") is None
    assert schedule.pop_due(100.0) == ["x", "p3", "p9"]


def test_take_due_takes_nothing_without_room() -> None:
    schedule: Schedule[str] = Schedule()
    schedule.set("p", 1.0)

    assert schedule.take_due(5.0, accept=lambda _key: True, limit=0) == []
    assert schedule.due_of("p") == 1.0
