"""The supervisor of background loops: restart after a crash, health from the crash streak."""

from __future__ import annotations

import asyncio

import pytest

from captchatask.supervise import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_crashing_loop_is_restarted_counted_and_unhealthy_after_a_streak() -> None:
    runs = 0
    seen: list[BaseException | None] = []
    clock = Clock()
    working = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ValueError("boom")
        working.set()  # the fourth run works (until the test ends)
        await asyncio.Event().wait()

    supervisor = Supervisor(
        name="loop", loop=loop, on_crash=seen.append, initial_backoff=0, clock=clock
    )
    task = asyncio.create_task(supervisor.run())
    await working.wait()
    assert supervisor.crashes == 3
    assert [type(exc) for exc in seen] == [ValueError] * 3
    young = supervisor.healthy  # three in a row, and the fourth run is young
    clock.now += supervisor.stable_after
    stable = supervisor.healthy  # it has run long enough
    assert (young, stable) == (False, True)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert supervisor.crashes == 3  # cancellation is not a crash


async def test_a_loop_that_returns_is_restarted_too() -> None:
    runs = 0
    seen: list[BaseException | None] = []
    working = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            working.set()
            await asyncio.Event().wait()

    supervisor = Supervisor(name="loop", loop=loop, on_crash=seen.append, initial_backoff=0)
    task = asyncio.create_task(supervisor.run())
    await working.wait()
    assert seen == [None]
    assert supervisor.healthy
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_long_run_resets_the_crash_streak() -> None:
    clock = Clock()
    runs = 0
    working = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            clock.now += 3600  # this run lasted an hour before crashing
        if runs <= 3:
            raise RuntimeError("boom")
        working.set()
        await asyncio.Event().wait()

    supervisor = Supervisor(name="loop", loop=loop, initial_backoff=0, clock=clock)
    task = asyncio.create_task(supervisor.run())
    await working.wait()
    assert (supervisor.crashes, supervisor.streak) == (3, 1)
    assert supervisor.healthy
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
