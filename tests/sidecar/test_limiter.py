"""The adaptive bound on ledger writes in flight, driven by a fake clock (no sleeping, no timing).

Each test feeds write times (RTTs) as the API server would produce them and checks where the
limit goes: up while writes are about as fast as unloaded, down as they queue, down at once on a
timeout, never outside its bounds, and never up while the path is idle.
"""

from __future__ import annotations

import math

import pytest

from captchatask_sidecar.drainer import BUSY_CONCURRENCY
from captchatask_sidecar.limiter import (
    Decision,
    GradientLimit,
    LedgerGate,
    LimitSettings,
    next_limit,
)
from captchatask_sidecar.settings import DEFAULT_DRAIN_CONCURRENCY, load


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SETTINGS = LimitSettings(initial=4, minimum=1, maximum=32, tolerance=2.0, window_seconds=0.1)


def window(limit: GradientLimit, clock: FakeClock, rtt: float, *, writes: int) -> None:
    """``writes`` writes of ``rtt`` seconds, as many in flight as allowed; then the window ends."""
    started = 0
    while started < writes:
        batch = 0
        while started < writes and limit.acquire():
            started += 1
            batch += 1
        assert batch, "the limit admitted nothing"
        if started >= writes:
            clock.advance(limit.settings.window_seconds)
        for _ in range(batch):
            limit.release(rtt)


def test_the_limit_admits_up_to_its_value_and_no_more() -> None:
    limit = GradientLimit(SETTINGS, clock=FakeClock())
    assert [limit.acquire() for _ in range(5)] == [True, True, True, True, False]
    assert (limit.in_flight, limit.available) == (4, 0)
    limit.release(0.004)
    assert limit.available == 1


def test_the_limit_grows_while_writes_take_their_unloaded_time() -> None:
    clock = FakeClock()
    limit = GradientLimit(SETTINGS, clock=clock)
    for _ in range(80):
        window(limit, clock, 0.004, writes=64)
    assert limit.limit == SETTINGS.maximum
    assert limit.noload == pytest.approx(0.004)


def test_the_limit_shrinks_when_writes_queue_behind_each_other() -> None:
    clock = FakeClock()
    limit = GradientLimit(SETTINGS, clock=clock)
    for _ in range(80):
        window(limit, clock, 0.004, writes=64)
    grown = limit.limit
    for _ in range(40):
        window(limit, clock, 0.040, writes=64)  # ten times the unloaded time
    assert limit.limit < grown / 4
    assert limit.current == pytest.approx(0.040)


def test_writes_within_the_tolerance_do_not_shrink_the_limit() -> None:
    clock = FakeClock()
    limit = GradientLimit(SETTINGS, clock=clock)
    for _ in range(10):
        window(limit, clock, 0.004, writes=64)
    before = limit.limit
    window(limit, clock, 0.0079, writes=64)  # just under twice the unloaded time
    assert limit.limit >= before


def test_a_timeout_halves_the_limit_at_once_but_never_below_the_minimum() -> None:
    limit = GradientLimit(SETTINGS, clock=FakeClock())
    assert limit.acquire()
    limit.drop()
    assert (limit.limit, limit.in_flight) == (2.0, 0)
    for _ in range(5):
        assert limit.acquire()
        limit.drop()
    assert limit.limit == SETTINGS.minimum
    assert limit.acquire()  # the minimum always lets one write through


def test_an_idle_path_does_not_grow_its_limit() -> None:
    clock = FakeClock()
    limit = GradientLimit(SETTINGS, clock=clock)
    for _ in range(40):  # one write at a time: never more than half the limit in use
        for _ in range(6):
            assert limit.acquire()
            clock.advance(0.02)
            limit.release(0.004)
    assert limit.limit == SETTINGS.initial


def test_a_short_window_is_extended_until_it_has_enough_samples() -> None:
    clock = FakeClock()
    limit = GradientLimit(SETTINGS, clock=clock)
    for _ in range(SETTINGS.min_window_samples - 1):
        assert limit.acquire()
        clock.advance(1.0)
        limit.release(0.5)
    assert limit.current is None
    assert limit.acquire()
    limit.release(0.5)
    assert limit.current == pytest.approx(0.5)


def test_the_no_load_time_follows_an_api_server_that_became_slower_for_good() -> None:
    settings = LimitSettings(noload_windows=5)
    clock = FakeClock()
    limit = GradientLimit(settings, clock=clock)
    window(limit, clock, 0.004, writes=16)
    for _ in range(settings.noload_windows + 1):  # +1: the first also holds older samples
        window(limit, clock, 0.050, writes=16)
    assert limit.noload == pytest.approx(0.050)


@pytest.mark.parametrize(
    ("noload", "current", "expected_gradient"),
    [(0.004, 0.004, 1.0), (0.004, 0.008, 1.0), (0.004, 0.016, 0.5), (0.004, 0.4, 0.5)],
)
def test_the_gradient_is_the_tolerated_ratio_of_no_load_to_current_time(
    noload: float, current: float, expected_gradient: float
) -> None:
    settings = LimitSettings(maximum=1000, smoothing=1.0)
    limit = 16.0
    got = next_limit(limit, noload=noload, current=current, peak_in_flight=16, settings=settings)
    assert got == pytest.approx(limit * expected_gradient + math.sqrt(limit))


@pytest.mark.parametrize(
    "bad",
    [
        {"minimum": 0},
        {"initial": 40, "maximum": 16},
        {"tolerance": 0.5},
        {"smoothing": 0.0},
    ],
)
def test_impossible_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        LimitSettings(**bad)  # type: ignore[arg-type]


def test_the_gate_diverts_beyond_the_limit_and_while_results_wait_in_the_spool() -> None:
    gate = LedgerGate(GradientLimit(LimitSettings(initial=2, maximum=2), clock=FakeClock()))
    assert [gate.decide() for _ in range(3)] == [Decision.WRITE, Decision.WRITE, Decision.LIMIT]
    gate.limit.release(0.004)
    gate.backlog = True  # the diverted result was spooled
    assert gate.decide() is Decision.BACKLOG  # join the spool behind it, even with a free slot
    gate.backlog = False
    gate.replay_started()
    assert gate.decide() is Decision.BACKLOG  # the drainer is behind: join the spool
    gate.replay_finished()
    assert gate.decide() is Decision.WRITE
    assert gate.limit.in_flight == 2


def test_while_pingbacks_arrive_the_drainer_keeps_no_more_writes_in_flight_than_they_may() -> None:
    # The replays' answers share the sidecar's event loop with the pingbacks: while pingbacks
    # arrive, a drainer deeper than the pingback path's own limit held every one of them up
    # behind its bursts of answers (pingback p99 above 10 ms at twice the API server's limit).
    assert LimitSettings().maximum >= BUSY_CONCURRENCY
    assert load(["--pingback-key-file", "k"], {}).drain_concurrency == DEFAULT_DRAIN_CONCURRENCY
