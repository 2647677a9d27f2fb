"""A drainer cancelled at shutdown leaves no replay running behind it.

The replays in flight are the drainer's to cancel when it is cancelled (``Drainer.run``'s
``finally``), so none outlives the spool and the session the app closes right after. When a
replay met an API server that was away, the drainer waited for the others in flight, and it had
taken them off its books before that wait: cancelled there, it cancelled nothing, and they ran
on past the spool's close (their results, resolved after it, were replayed at the next start).
"""

from __future__ import annotations

import asyncio

import pytest

from captchatask_sidecar.drainer import _all_done


async def test_replays_waited_for_after_an_outage_are_still_cancelled_at_shutdown() -> None:
    release = asyncio.Event()

    async def replay() -> str:
        await release.wait()
        return "recorded"

    running = {asyncio.create_task(replay()) for _ in range(3)}
    waiting = asyncio.create_task(_all_done(running))
    await asyncio.sleep(0)  # it waits for the three now
    waiting.cancel()  # what cancelling Drainer.run does there
    with pytest.raises(asyncio.CancelledError):
        await waiting
    try:
        assert len(running) == 3, "the replays left the drainer's books before they ended"
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    # Ended replays do leave them, with their outcomes.
    release.set()
    running = {asyncio.create_task(replay()) for _ in range(2)}
    done = await _all_done(running)
    assert running == set()
    assert [task.result() for task in done] == ["recorded", "recorded"]
